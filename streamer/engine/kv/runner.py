"""Run a Hugging Face causal LM on a packed step over the paged KV cache.

A step is several sequences' new tokens concatenated into one row (batch 1): some sequences run a
prompt chunk, others decode one token. The runner builds the step's `PagedStep` (slots, block
tables, lengths) once, calls the model's own forward with `position_ids` and ``use_cache=False``
(no HF cache object: keys and values live in our `KVPool`, written by the attention function),
and returns the logits of each sequence's last new token. Any architecture whose attention goes
through transformers' `AttentionInterface` works, since the layers are the checkpoint's.

What transformers does with such a call (5.x): the model's mask helpers see an attention
implementation without a registered mask function and build no mask at all; rotary embeddings
come from `position_ids`, which restart per sequence; `logits_to_keep` (a tensor of row indices)
makes the LM head project only the rows that are sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamer.engine.attention import (
    ATTENTION_NAME,
    PagedStep,
    paged_step,
    register_paged_attention,
)
from streamer.engine.kv.block_manager import DEFAULT_BLOCK_SIZE
from streamer.engine.kv.pool import KVLayout, KVPool


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step (what the scheduler hands the runner)."""

    token_ids: Sequence[int]
    """The tokens to compute now: a prompt chunk, or the one token sampled last step."""
    start: int
    """Tokens of this sequence already in the KV cache; the first new token's position."""
    block_table: Sequence[int]
    """Its blocks (from the BlockManager), covering positions [0, start + len(token_ids))."""


class PagedRunner:
    """The model of one stage plus its KV pool; `step()` runs one packed step."""

    def __init__(self, model: Any, pool: KVPool) -> None:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl != ATTENTION_NAME:
            raise ValueError(
                f"model uses attn_implementation={impl!r}; load it with "
                f"attn_implementation={ATTENTION_NAME!r} (PagedRunner.from_pretrained does)"
            )
        self.model = model.eval()
        self.pool = pool
        self.device = pool.device
        keep = getattr(model, "_supports_logits_to_keep", None)
        self._logits_to_keep = bool(keep and keep())

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        kv_cache_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **model_kwargs: Any,
    ) -> PagedRunner:
        """Load a checkpoint with the paged attention and a pool sized by blocks or bytes."""
        from transformers import AutoModelForCausalLM

        if (kv_cache_bytes is None) == (num_blocks is None):
            raise ValueError("pass exactly one of kv_cache_bytes and num_blocks")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=register_paged_attention(), **model_kwargs
        ).to(device)
        layout = KVLayout.from_config(model.config, block_size=block_size, dtype=dtype)
        pool = (
            KVPool(layout, num_blocks, device)
            if num_blocks is not None
            else KVPool.from_budget(layout, kv_cache_bytes or 0, device)
        )
        return cls(model, pool)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def prepare(self, chunks: Sequence[SeqChunk]) -> tuple[PagedStep, torch.Tensor]:
        """The step's attention metadata and its packed token ids [T] (host work only)."""
        step = PagedStep(
            self.pool,
            query_lens=[len(c.token_ids) for c in chunks],
            context_lens=[c.start + len(c.token_ids) for c in chunks],
            block_tables=[c.block_table for c in chunks],
        )
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        return step, ids.to(self.device)

    @torch.inference_mode()
    def step(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] (float32) of each chunk's last token."""
        if not chunks:
            return torch.empty(0, 0)
        step, ids = self.prepare(chunks)
        last = torch.cumsum(torch.tensor([len(c.token_ids) for c in chunks]), 0) - 1
        last = last.to(self.device)
        kwargs: dict[str, Any] = {"logits_to_keep": last} if self._logits_to_keep else {}
        with paged_step(step):
            out = self.model(
                input_ids=ids[None], position_ids=step.positions[None], use_cache=False, **kwargs
            )
        logits = out.logits[0]  # [N or T, V]
        if not self._logits_to_keep:
            logits = logits[last]
        return logits.float()
