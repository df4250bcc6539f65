"""Pipeline stages: a range of layers on one device with its own KV cache, run on its own thread.

Stages are linked by asyncio queues. The engine keeps up to N (= stages) micro-batches in flight,
so while stage 1 runs micro-batch A, stage 0 runs micro-batch B.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from streamer.aio import cancel_and_wait
from streamer.engine.model import ModelShape


@dataclass
class StepBatch:
    """One micro-batch, flattened: T tokens from several sequences (built on CPU by the engine)."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    token_slots: torch.Tensor  # [T] long: each token's KV slot
    decode_rows: torch.Tensor  # [m] long: rows of T that are single-token (decode) items
    decode_slots: torch.Tensor  # [m] long: their slots
    decode_lens: torch.Tensor  # [m] long: keys each attends to (position + 1)
    prefills: list[tuple[int, int, int, int]]  # (row, num_tokens, slot, start) per multi-token item
    sample_rows: torch.Tensor  # [n] long: rows whose logits are sampled
    sampler: Callable[[torch.Tensor], list[int]]  # logits [n, V] -> token ids, on the last stage
    slot_span: tuple[int, int] = (0, 0)  # decode slots lie in [lo, hi)
    max_decode_len: int = 0


class Stage:
    """Layers [a, b) of the model on one device, with the KV cache of exactly those layers."""

    def __init__(
        self,
        index: int,
        device: torch.device,
        modules: dict[str, Any],
        shape: ModelShape,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
    ) -> None:
        self.index = index
        self.device = device
        self.layers = [layer.to(device) for layer in modules["layers"]]
        self.embed = modules["embed"].to(device) if modules["embed"] is not None else None
        self.norm = modules["norm"].to(device) if modules["norm"] is not None else None
        self.lm_head = modules["lm_head"].to(device) if modules["lm_head"] is not None else None
        self.rotary = modules["rotary"]
        self.rotary_device = copy_rotary(self.rotary, device)
        self.shape = shape
        self.group_size = shape.num_heads // shape.num_kv_heads
        cache_shape = (num_slots, shape.num_kv_heads, max_len, shape.head_dim)
        # Allocated once, up front: a step only writes the new tokens' keys and values.
        self.k_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, dtype=dtype, device=device) for _ in self.layers]
        self.busy_seconds = 0.0
        self.current: str = "idle"

    def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> Any:
        """Run this stage's layers. First stage takes token ids; the last returns token ids."""
        began = time.perf_counter()
        self.current = f"forward of {batch.input_ids.numel()} tokens"
        try:
            with torch.inference_mode():
                return self._forward(batch, hidden)
        finally:
            self.busy_seconds += time.perf_counter() - began
            self.current = "idle"

    def _forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> Any:
        dev = self.device
        positions = batch.positions.to(dev, non_blocking=True)
        slots = batch.token_slots.to(dev, non_blocking=True)
        if self.embed is not None:
            hidden = self.embed(batch.input_ids.to(dev, non_blocking=True))  # [T, H]
        assert hidden is not None
        hidden = hidden.to(dev, non_blocking=True)
        cos, sin = self.rotary_device(hidden, positions[None])  # [1, T, D]
        cos, sin = cos[0], sin[0]  # [T, D]
        decode = self._decode_inputs(batch, dev)
        for i, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            x = self._attention(layer.self_attn, x, cos, sin, positions, slots, i, batch, decode)
            hidden = residual + x
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        if self.lm_head is None:
            return hidden
        if batch.sample_rows.numel() == 0:
            return []
        assert self.norm is not None
        last = self.norm(hidden[batch.sample_rows.to(dev)])
        logits = self.lm_head(last).float()  # [n, V]
        return batch.sampler(logits)

    def _decode_inputs(self, batch: StepBatch, dev: torch.device) -> dict[str, torch.Tensor] | None:
        if batch.decode_rows.numel() == 0:
            return None
        lo, hi = batch.slot_span
        rel = (batch.decode_slots - lo).to(dev)
        lens = torch.ones(hi - lo, dtype=torch.long)
        lens[batch.decode_slots - lo] = batch.decode_lens
        keys = torch.arange(batch.max_decode_len)
        # Rows of the slice that are not in this step attend to one key; their output is dropped.
        mask = (keys[None, :] < lens[:, None]).to(dev)  # [S, L]
        return {"rows": batch.decode_rows.to(dev), "rel": rel, "mask": mask[:, None, None, :]}

    def _attention(
        self,
        attn: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        layer: int,
        batch: StepBatch,
        decode: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        T = x.shape[0]
        nh, nkv, d, g = (
            self.shape.num_heads,
            self.shape.num_kv_heads,
            self.shape.head_dim,
            self.group_size,
        )
        q = attn.q_proj(x).view(T, nh, d)
        k = attn.k_proj(x).view(T, nkv, d)
        v = attn.v_proj(x).view(T, nkv, d)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache[slots, :, positions] = k  # write only the new tokens' keys/values
        v_cache[slots, :, positions] = v
        scale = getattr(attn, "scaling", d**-0.5)
        out = torch.empty(T, nh, d, dtype=q.dtype, device=q.device)
        if decode is not None:
            lo, hi = batch.slot_span
            length = batch.max_decode_len
            keys = k_cache[lo:hi, :, :length]  # [S, nkv, L, D]: a view, no copy
            values = v_cache[lo:hi, :, :length]
            # GQA without repeating the cache: a kv head's G query heads act as G query rows.
            qd = q.new_zeros(hi - lo, nkv, g, d)
            qd[decode["rel"]] = q[decode["rows"]].view(-1, nkv, g, d)
            od = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=decode["mask"], scale=scale
            )
            out[decode["rows"]] = od[decode["rel"]].reshape(-1, nh, d)
        for row, num, slot, start in batch.prefills:
            total = start + num
            keys = k_cache[slot, :, :total]  # [nkv, L, D]
            values = v_cache[slot, :, :total]
            qp = (
                q[row : row + num].view(num, nkv, g, d).permute(1, 2, 0, 3).reshape(nkv, g * num, d)
            )
            query_pos = torch.arange(start, total, device=q.device).repeat(g)  # [G*t]
            mask = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]
            op = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=scale)
            out[row : row + num] = op.view(nkv, g, num, d).permute(2, 0, 1, 3).reshape(num, nh, d)
        return attn.o_proj(out.view(T, nh * d))


def copy_rotary(rotary: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Each stage computes rotary tables on its own device from the checkpoint's rotary module."""
    return copy.deepcopy(rotary).to(device)


_STOP = object()


class Pipeline:
    """Runs StepBatches through the stages; results come out in submission order."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{i}")
            for i in range(len(stages))
        ]
        self._queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(len(stages) + 1)]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def depth(self) -> int:
        return len(self.stages)

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._run_stage(i), name=f"stage-{i}") for i in range(self.depth)
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        for executor in self._executors:
            executor.shutdown(wait=True)

    async def submit(self, batch: StepBatch) -> None:
        await self._queues[0].put((batch, None))

    async def result(self) -> tuple[StepBatch, list[int] | BaseException]:
        return await self._queues[-1].get()

    async def _run_stage(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        stage, executor = self.stages[index], self._executors[index]
        inbox, outbox = self._queues[index], self._queues[index + 1]
        while True:
            batch, payload = await inbox.get()
            if not isinstance(payload, BaseException):
                try:
                    payload = await loop.run_in_executor(executor, stage.forward, batch, payload)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a model fault fails this micro-batch, not the worker
                    payload = exc
            await outbox.put((batch, payload))
