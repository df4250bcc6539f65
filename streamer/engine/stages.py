"""Pipeline stages: a range of the checkpoint's own decoder layers on one device, with the paged
KV memory (`KVPool`) of exactly those layers, run on its own thread.

Every stage runs the model's own forward over its layers (`StageShell`), loaded with
``attn_implementation="streamer_paged"``: embedding, rotary, layers, norms and head are the
checkpoint's code, and attention reads and writes this stage's pool through the step's
`PagedStep`, made current on the stage's thread. All stages share
the block tables (the engine's one `BlockManager` hands them out); each pool has the same number of
blocks, holding its own layers' keys and values.

Stages are linked by asyncio queues. The engine keeps up to N (= stages) micro-batches in flight,
so while stage 1 runs micro-batch A, stage 0 runs micro-batch B.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from streamer.aio import cancel_and_wait
from streamer.engine.attention import PagedStep, paged_step
from streamer.engine.kv.pool import KVLayout, KVPool
from streamer.engine.shell import StageShell


@dataclass
class StepBatch:
    """One micro-batch, packed: each sequence's new tokens, one after the other (host tensors)."""

    input_ids: torch.Tensor  # [T] long
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence after this step
    block_tables: list[Sequence[int]]  # each sequence's blocks (shared by every stage)
    sample_rows: torch.Tensor  # [n] long: rows of T whose logits are sampled
    sampler: Callable[[torch.Tensor], list[int]]  # logits [n, V] -> token ids, on the last stage


class Stage:
    """Decoder layers [a, b) of the model on one device, with the KV blocks of those layers."""

    def __init__(self, index: int, device: torch.device, shell: StageShell, layers: range) -> None:
        self.index = index
        self.device = device
        self.layer_range = layers
        self.shell = shell
        self.pool: KVPool | None = None
        self.busy_seconds = 0.0
        self.current: str = "idle"

    def allocate_kv(self, layout: KVLayout, num_blocks: int) -> None:
        """Allocate this stage's blocks (once, after every stage's weights are in place)."""
        self.pool = KVPool(layout, num_blocks, self.device)

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

    def run(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        """Hidden states for the next stage, or the sampled rows' logits [n, V] (float32)."""
        assert self.pool is not None, "allocate_kv first"
        dev = self.device
        # Slots and masks for this stage's pool: same block tables, this device.
        step = PagedStep(self.pool, batch.query_lens, batch.context_lens, batch.block_tables)
        ids = batch.input_ids.to(dev, non_blocking=True) if self.shell.first else None
        if hidden is not None:
            hidden = hidden.to(dev, non_blocking=True)
        with paged_step(step):
            out = self.shell.forward(ids, hidden, step.positions, batch.sample_rows.to(dev))
        return out.float() if self.shell.last else out

    def _forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> Any:
        out = self.run(batch, hidden)
        if not self.shell.last:
            return out
        # No sampled row: only prompt chunks that do not end their prompt (the cache is the point).
        return batch.sampler(out) if batch.sample_rows.numel() else []


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

    @property
    def pid(self) -> int | None:
        """The model process's pid; None: the stages run in this process."""
        return None

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

    def check(self) -> None:
        """Nothing to check: the stages are this process's threads (see RemotePipeline)."""

    async def warm(self, steps: list[StepBatch], compile: bool) -> bool:
        """The model side of the warm-up (engine/warmup.py); whether the stages compiled."""
        from streamer.engine.warmup import warm_stages  # warmup builds on this module

        return await warm_stages(self, steps, compile)

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
