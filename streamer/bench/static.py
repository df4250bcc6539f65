"""Static micro-batching (the seed's baseline): batches cut in arrival order, run to the longest.

Each batch (up to `max_batch` requests, or those that arrived within `window_s` of its first) is
padded on the left and run with transformers' greedy `generate()` until its longest member has
all its tokens; only each request's own tokens count as useful. A batch starts when its last
member has arrived and the previous batch is done.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from streamer.bench.results import SystemResult
from streamer.bench.stats import RequestTiming, cut_batches
from streamer.bench.workload import Workload


def run_static(model: Any, workload: Workload, *, pad_id: int, max_batch: int = 32,
               window_s: float = 0.010) -> SystemResult:
    result = SystemResult("static",
                          f"static micro-batching (<= {max_batch}, {window_s * 1000:g} ms)")
    requests = workload.requests
    batches = cut_batches([r.arrival_s for r in requests], max_batch, window_s)
    timings: list[RequestTiming] = []
    computed = 0
    try:
        # Warm-up (first kernels, allocator) outside the timed window, like the other systems.
        _generate(model, [list(r.prompt_ids) for r in requests[:4]], 4, pad_id)
        began = time.monotonic()
        for batch in batches:
            members = [requests[i] for i in batch]
            # A full batch goes at once; a partial one when its window closes.
            closes = max(r.arrival_s for r in members) if len(members) >= max_batch else (
                members[0].arrival_s + window_s)
            ready = began + closes
            if (wait := ready - time.monotonic()) > 0:
                time.sleep(wait)
            longest = max(r.max_tokens for r in members)
            _generate(model, [list(r.prompt_ids) for r in members], longest, pad_id)
            done = time.monotonic()
            computed += longest * len(members)
            # Non-streaming: every token of the batch arrives when generate() returns.
            timings.extend(RequestTiming(r.request_id, r.lane, began + r.arrival_s, r.max_tokens,
                                         [(done, r.max_tokens)], done, True, "length")
                           for r in members)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.wall_s = time.monotonic() - began
    result.useful_tokens = sum(r.max_tokens for r in requests)
    result.timings = timings
    result.details = {"batches": len(batches), "max_batch": max_batch, "window_s": window_s,
                      "generated_tokens": computed,
                      "useful_fraction": result.useful_tokens / computed if computed else 0.0}
    return result


@torch.inference_mode()
def _generate(model: Any, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    # min_new_tokens = max_new_tokens: EOS never ends a row early (the engine runs with
    # ignore_eos), so the batch computes exactly `max_new_tokens` steps.
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                   min_new_tokens=max_new_tokens, pad_token_id=pad_id)
