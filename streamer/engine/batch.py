"""A step plan packed into the tensors the pipeline runs (host side, no model code)."""

from __future__ import annotations

import functools

import torch

from streamer.engine.kv.block_manager import BlockManager
from streamer.engine.request_table import RequestTable
from streamer.engine.sampling import sample, token_seed
from streamer.engine.scheduler import StepPlan
from streamer.engine.sequence import SamplingParams, Sequence
from streamer.engine.stages import StepBatch


def build_batch(plan: StepPlan, blocks: BlockManager, requests: RequestTable) -> StepBatch:
    ids: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[tuple[int, ...]] = []
    sample_rows: list[int] = []
    params: list[SamplingParams] = []
    seeds: list[int | None] = []
    row = 0
    for item in plan.items:
        seq, start, num = item.seq, item.start, item.num_tokens
        ids.extend(token_slice(seq, start, num))
        query_lens.append(num)
        context_lens.append(start + num)
        tables.append(blocks.block_table(seq.request_id))
        if item.sample:
            sample_rows.append(row + num - 1)
            params.append(seq.params)
            seed = requests[seq.request_id].seed
            seeds.append(None if seed is None else token_seed(seed, len(seq.output_ids)))
        row += num
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return StepBatch(
        input_ids=as_long(ids),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        sample_rows=as_long(sample_rows),
        sampler=functools.partial(sample, params=params, seeds=seeds),  # picklable
    )


def token_slice(seq: Sequence, start: int, num: int) -> list[int]:
    """Tokens [start, start + num) of prompt + output, without joining the two lists."""
    prompt_len = len(seq.prompt_ids)
    if start >= prompt_len:
        return seq.output_ids[start - prompt_len : start - prompt_len + num]
    end = start + num
    if end <= prompt_len:
        return seq.prompt_ids[start:end]
    return seq.prompt_ids[start:] + seq.output_ids[: end - prompt_len]
