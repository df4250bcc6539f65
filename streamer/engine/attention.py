"""One attention function for every decoder architecture: paged KV cache through transformers'
`AttentionInterface`.

Registered as ``"streamer_paged"``; a model loaded with
``from_pretrained(..., attn_implementation="streamer_paged")`` runs its own layers (projections,
norms, rotary, MLP, residuals) and calls `paged_attention_forward` with the projected, rotated
query/key/value of a packed step. The model never sees the cache layout: the runner builds a
`PagedStep` once per step and makes it current with `paged_step(...)` (thread-local, so each
pipeline stage's thread has its own) around the model call.

Per layer the function
1. writes the new tokens' keys and values into the stage's `KVPool` at their slots;
2. attends each sequence's queries to its cached + new keys: decoding sequences (one new token)
   all at once through a gathered ``[B, blocks * block_size]`` view with a length mask; prefilling
   sequences one SDPA call each, causal within the chunk and full over the cached prefix.

Grouped-query attention never repeats keys: the G query heads of a kv head are folded into the
query-row dimension (``[H_kv, G * n, D]`` against ``[H_kv, L, D]``). The kwargs the model passes
are honoured: `scaling`, `sliding_window` (key j is visible from query position p iff
``p - W < j <= p``, as in transformers' masks), `softcap` (Gemma 2 style ``tanh`` capping) and
attention sinks (`module.sinks`, gpt-oss style). Bidirectional attention is refused.

transformers builds no mask for an attention implementation that has no entry in its
`AttentionMaskInterface`, so packed steps cost no dense ``[T, T]`` mask; the masks here are per
sequence (prefill) or ``[B, L]`` booleans (decode), built once per step and shared by the layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from streamer.engine.kv.pool import KVPool

ATTENTION_NAME = "streamer_paged"


@dataclass
class _Decodes:
    """The step's sequences with one new token, attended together."""

    rows: torch.Tensor  # [B] long: their token's row in the packed step
    tables: torch.Tensor  # [B, nb] long: block tables (padded with block 0, masked)
    context_lens: torch.Tensor  # [B] long: keys each attends to (cached + the new one)
    block_size: int
    views: dict[int | None, tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)

    def keys(self, window: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Blocks to gather (flat [B * nb']), keys per row L = nb' * block_size, and the mask
        [B, 1, 1, L]. A sliding layer reads only the blocks its window overlaps."""
        if window not in self.views:
            b, nb = self.tables.shape
            bs, ctx = self.block_size, self.context_lens
            first = torch.zeros_like(ctx)  # first block each sequence reads
            width = nb if window is None else min(nb, -(-window // bs) + 1)
            if width < nb:
                first = ((ctx - window).clamp(min=0) // bs).clamp(max=nb - width)
            index = first[:, None] + torch.arange(width, device=ctx.device)  # [B, nb']
            offsets = torch.arange(bs, device=ctx.device)
            positions = (index[:, :, None] * bs + offsets).view(b, width * bs)  # [B, L]
            visible = positions < ctx[:, None]
            if window is not None:
                visible &= positions > (ctx - 1 - window)[:, None]
            blocks = self.tables.gather(1, index).flatten()
            self.views[window] = (blocks, width * bs, visible[:, None, None, :])
        return self.views[window]


@dataclass
class _Prefill:
    """One sequence with several new tokens (a prompt chunk)."""

    start: int  # first row in the packed step
    num_tokens: int
    context_len: int  # keys it attends to (cached prefix + this chunk)
    blocks: torch.Tensor  # [nb] long
    block_size: int
    views: dict[tuple[int | None, int], tuple[torch.Tensor, int, torch.Tensor]] = field(
        default_factory=dict
    )

    def keys(self, window: int | None, groups: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Blocks to gather, keys to keep from them (L) and the mask [G * n, L]."""
        key = (window, groups)
        if key not in self.views:
            ctx, n, bs = self.context_len, self.num_tokens, self.block_size
            first = 0 if window is None else max(0, ctx - n - window + 1) // bs
            device = self.blocks.device
            positions = torch.arange(first * bs, ctx, device=device)[None, :]
            queries = torch.arange(ctx - n, ctx, device=device)[:, None]
            visible = positions <= queries
            if window is not None:
                visible &= positions > queries - window
            self.views[key] = (self.blocks[first:], ctx - first * bs, visible.repeat(groups, 1))
        return self.views[key]


class PagedStep:
    """Attention metadata of one packed step, built once by the runner and read by every layer.

    Sequence i contributes `query_lens[i]` consecutive tokens to the packed batch; after the step
    it has `context_lens[i]` tokens in the cache, the new ones at positions
    ``[context_lens[i] - query_lens[i], context_lens[i])``, stored in the blocks of
    `block_tables[i]` (which must cover all `context_lens[i]` positions).
    """

    def __init__(
        self,
        pool: KVPool,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> None:
        if not len(query_lens) == len(context_lens) == len(block_tables) > 0:
            raise ValueError("a step needs one query length, context length and table per seq")
        bs = pool.block_size
        for q, c, table in zip(query_lens, context_lens, block_tables, strict=True):
            if not 1 <= q <= c <= len(table) * bs:
                raise ValueError(
                    f"query_len={q}, context_len={c} and {len(table)} blocks of {bs} "
                    "do not fit together"
                )
        self.pool = pool
        device = pool.device
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([[*t, *[0] * (width - len(t))] for t in block_tables])  # [N, nb]
        q_lens = torch.tensor(query_lens)
        c_lens = torch.tensor(context_lens)
        # Per token: its sequence and position; then its slot in the pool.
        seq_of = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)  # [T]
        firsts = torch.cumsum(q_lens, 0) - q_lens  # row of each sequence's first token
        positions = torch.arange(int(q_lens.sum())) - firsts[seq_of] + (c_lens - q_lens)[seq_of]
        slots = tables[seq_of, positions // bs] * bs + positions % bs
        self.positions = positions.to(device)  # [T] long: position of each new token
        self.slot_mapping = slots.to(device)  # [T] long: flat slot of each new token
        self.num_tokens = int(q_lens.sum())

        decode = [i for i, q in enumerate(query_lens) if q == 1]
        self.decodes: list[_Decodes] = []
        for group in decode_buckets(decode, [-(-context_lens[i] // bs) for i in decode]):
            nb = max(-(-context_lens[i] // bs) for i in group)
            index = torch.tensor(group)
            self.decodes.append(
                _Decodes(
                    rows=firsts[index].to(device),
                    tables=tables[index, :nb].to(device),
                    context_lens=c_lens[index].to(device),
                    block_size=bs,
                )
            )
        self.prefills = [
            _Prefill(
                start=int(firsts[i]),
                num_tokens=q,
                context_len=context_lens[i],
                blocks=tables[i, : -(-context_lens[i] // bs)].to(device),
                block_size=bs,
            )
            for i, q in enumerate(query_lens)
            if q > 1
        ]


# Decode sequences attend in buckets of similar length, so padding to the longest in a bucket
# costs at most this factor over a sequence's own blocks (or SLACK blocks, for short ones).
BUCKET_GROWTH = 2
BUCKET_SLACK = 8


def decode_buckets(items: Sequence[int], blocks: Sequence[int]) -> list[list[int]]:
    """Split decode sequences (`items`, with their block counts) into groups attended together:
    sorted by length, a new group starts where a sequence has more than BUCKET_GROWTH times the
    blocks of the group's shortest (and BUCKET_SLACK more). A batch of similar lengths stays one
    SDPA call; one long sequence no longer makes every short one read its length."""
    order = sorted(range(len(items)), key=lambda i: blocks[i])
    groups: list[list[int]] = []
    floor = 0
    for i in order:
        if not groups or (blocks[i] > BUCKET_GROWTH * floor and blocks[i] - floor > BUCKET_SLACK):
            groups.append([])
            floor = blocks[i]
        groups[-1].append(items[i])
    return groups


_local = threading.local()


@contextmanager
def paged_step(step: PagedStep) -> Iterator[PagedStep]:
    """Make `step` the one the attention layers of this thread read during the model call."""
    previous = getattr(_local, "step", None)
    _local.step = step
    try:
        yield step
    finally:
        _local.step = previous


def current_step() -> PagedStep:
    step = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError(
            f"{ATTENTION_NAME!r} attention called outside `paged_step(...)`: run the model "
            "through streamer.engine.kv.runner.PagedRunner"
        )
    return step


def _attend(
    q: torch.Tensor,  # [..., M, D]
    k: torch.Tensor,  # [..., L, D]
    v: torch.Tensor,  # [..., L, Dv]
    mask: torch.Tensor,  # [..., M, L] bool (broadcastable)
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,  # [..., M, 1] logits, or None
) -> torch.Tensor:  # [..., M, Dv]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., M, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")).float()
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:  # a per-head logit that takes probability mass but has no value
        sink = sinks.float().expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]: the packed step, after rotary
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,  # ignored: masks come from the step
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface entry point; returns ``([1, T, Hq, D], None)``."""
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{ATTENTION_NAME!r} supports causal decoder attention only")
    step = current_step()
    k_cache, v_cache = step.pool.layer(module.layer_idx)  # [num_blocks, bs, Hkv, D]
    _, num_heads, num_tokens, head_dim = query.shape
    num_kv, dv = key.shape[1], value.shape[-1]
    groups = num_heads // num_kv
    scale = scaling if scaling is not None else head_dim**-0.5
    window = int(sliding_window) if sliding_window else None
    sinks = getattr(module, "sinks", None)  # [Hq]

    # 1. Write the new keys/values at their slots (before reading: chunks see themselves).
    k_cache.view(-1, num_kv, head_dim).index_copy_(
        0, step.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype)
    )
    v_cache.view(-1, num_kv, dv).index_copy_(
        0, step.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype)
    )

    q = query[0].transpose(0, 1)  # [T, Hq, D]
    out = q.new_empty(num_tokens, num_heads, dv)
    dtype = q.dtype

    # 2a. Single-token sequences, a bucket of similar lengths at a time, over a gathered [B, L]
    # view of their blocks.
    for dec in step.decodes:
        b = dec.rows.shape[0]
        blocks, length, mask = dec.keys(window)
        qd = q.index_select(0, dec.rows).view(b, num_kv, groups, head_dim)  # [B, Hkv, G, D]
        kb, vb = step.pool.gather(module.layer_idx, blocks)
        keys = kb.view(b, length, num_kv, head_dim).transpose(1, 2)
        values = vb.view(b, length, num_kv, dv).transpose(1, 2)
        sink = None if sinks is None else sinks.view(1, num_kv, groups, 1)
        od = _attend(qd, keys.to(dtype), values.to(dtype), mask, scale, softcap, sink)
        out.index_copy_(0, dec.rows, od.reshape(b, num_heads, dv))  # od: [B, Hkv, G, D]

    # 2b. Each prompt chunk: causal within itself, full over its cached prefix.
    for pre in step.prefills:
        n = pre.num_tokens
        blocks, length, mask = pre.keys(window, groups)
        qp = q[pre.start : pre.start + n].view(n, num_kv, groups, head_dim)
        qp = qp.permute(1, 2, 0, 3).reshape(num_kv, groups * n, head_dim)  # [Hkv, G*n, D]
        kb, vb = step.pool.gather(module.layer_idx, blocks)
        keys = kb.view(-1, num_kv, head_dim)[:length]
        values = vb.view(-1, num_kv, dv)[:length]  # [L, Hkv, D]
        sink = None
        if sinks is not None:
            sink = sinks.view(num_kv, groups, 1).expand(num_kv, groups, n)
            sink = sink.reshape(num_kv, groups * n, 1)
        op = _attend(
            qp,
            keys.transpose(0, 1).to(dtype),
            values.transpose(0, 1).to(dtype),
            mask,
            scale,
            softcap,
            sink,
        )  # [Hkv, G*n, D]
        out[pre.start : pre.start + n] = (
            op.view(num_kv, groups, n, dv).permute(2, 0, 1, 3).reshape(n, num_heads, dv)
        )
    return out.unsqueeze(0), None


def register_paged_attention() -> str:
    """Register the function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
