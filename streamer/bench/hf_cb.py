"""transformers' own continuous batching (`generate_batch` and the manager behind it).

`generate_batch(inputs, max_new_tokens=...)` takes one `max_new_tokens` for every request; run
that way, each request would compute up to the longest length and only its own tokens would
count, which measures a handicap rather than the batcher. So requests go through the manager
that `generate_batch` itself drives (`continuous_batching_context_manager` + `add_request`), each
with its own `max_new_tokens` and EOS disabled (`eos_token_id=-1`, like ignore_eos). Where that
API is missing, `generate_batch` is called with the longest length and the result says so.
A failure (CPU support varies between transformers versions) is recorded, never raised.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from streamer.bench.results import LABELS, SystemResult
from streamer.bench.workload import Workload


def run_hf_continuous(model: Any, workload: Workload, *, max_batch_tokens: int | None = None,
                      max_requests: int | None = None, kv_tokens: int | None = None,
                      timeout_s: float = 1800.0) -> SystemResult:
    """Limits like the engine's: `max_batch_tokens` per step, `max_requests` per batch and a
    KV cache of `kv_tokens` tokens. Left to itself on CPU the manager sizes its cache from free
    RAM (gigabytes, allocated page by page, for many seconds) which is set-up, not batching."""
    result = SystemResult("hf_cb", LABELS["hf_cb"])
    requests = workload.requests
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.max_new_tokens = max(r.max_tokens for r in requests)
    try:
        if hasattr(model, "continuous_batching_context_manager"):
            cb = _cb_config(max_batch_tokens, max_requests, kv_tokens)
            delivered, wall, api = _run_manager(model, workload, config, cb, timeout_s)
        else:
            delivered, wall, api = _run_generate_batch(model, workload, config)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.useful_tokens = delivered
    result.wall_s = wall
    result.details = {"api": api, "completed_tokens": delivered,
                      "max_batch_tokens": max_batch_tokens, "max_requests": max_requests,
                      "kv_tokens": kv_tokens}
    if delivered < workload.requested_tokens:
        result.details["short_by_tokens"] = workload.requested_tokens - delivered
    return result


def _cb_config(max_batch_tokens: int | None, max_requests: int | None,
               kv_tokens: int | None) -> Any:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    kwargs: dict[str, Any] = {"use_cuda_graph": False}
    if max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = max_batch_tokens
    if max_requests is not None:
        kwargs["max_requests_per_batch"] = max_requests
    if kv_tokens is not None:
        page = ContinuousBatchingConfig().page_size
        kwargs["num_blocks"] = max(1, -(-kv_tokens // page))
    return ContinuousBatchingConfig(**kwargs)


@torch.inference_mode()
def _run_manager(model: Any, workload: Workload, config: Any, cb_config: Any,
                 timeout_s: float) -> tuple[int, float, str]:
    from transformers.generation.continuous_batching.utils import WorkloadHints

    requests = workload.requests
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in requests),
                          max_generated_length=config.max_new_tokens,
                          num_requests=len(requests))
    with model.continuous_batching_context_manager(
            generation_config=config, continuous_batching_config=cb_config,
            block=True, timeout=5, warmup=False, workload_hints=hints) as manager:
        # Warm-up (cache allocation, first kernels) outside the timed window, like the engine's.
        warm = {f"warmup-{i}": 4 for i in range(min(4, len(requests)))}
        for (rid, n), r in zip(warm.items(), requests, strict=False):
            manager.add_request(list(r.prompt_ids), request_id=rid, max_new_tokens=n,
                                eos_token_id=-1)
        _collect(manager, warm, time.monotonic() + timeout_s)
        began = time.monotonic()
        for r in requests:
            manager.add_request(list(r.prompt_ids), request_id=r.request_id,
                                max_new_tokens=r.max_tokens, eos_token_id=-1)
        delivered = _collect(manager, {r.request_id: r.max_tokens for r in requests},
                             began + timeout_s)
        wall = time.monotonic() - began
    return delivered, wall, "continuous_batching_context_manager + add_request(max_new_tokens)"


def _collect(manager: Any, wanted: dict[str, int], deadline: float) -> int:
    """Wait for every request in `wanted`; return the tokens delivered (capped per request)."""
    pending = set(wanted)
    delivered = 0
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} requests unfinished at the deadline")
        out = manager.get_result(timeout=1)
        if out is None:
            if not manager.is_running():
                raise RuntimeError(f"the generation thread stopped with {len(pending)} "
                                   "requests unfinished")
            continue
        if out.request_id in pending and out.is_finished():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            pending.discard(out.request_id)
            delivered += min(len(out.generated_tokens), wanted[out.request_id])
    return delivered


@torch.inference_mode()
def _run_generate_batch(model: Any, workload: Workload, config: Any) -> tuple[int, float, str]:
    requests = workload.requests
    config.eos_token_id = -1
    began = time.monotonic()
    outputs = model.generate_batch([list(r.prompt_ids) for r in requests],
                                   generation_config=config)
    wall = time.monotonic() - began
    produced = [len(o.generated_tokens) for o in outputs.values()]
    delivered = sum(min(n, r.max_tokens) for n, r in zip(produced, requests, strict=False))
    return delivered, wall, "generate_batch(max_new_tokens=longest)"
