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
from streamer.bench.workload import Workload, warm_up_requests


def run_hf_continuous(model: Any, workload: Workload, *, kv_cache_bytes: int,
                      max_batch_tokens: int | None = None, max_requests: int | None = None,
                      timeout_s: float = 1800.0) -> SystemResult:
    """Limits like the engine's: `max_batch_tokens` per step, `max_requests` per batch and the
    engine's KV budget in bytes, cut into transformers' own pages (its default page size).

    Left to itself the manager sizes its cache from the device's free memory (on CPU: 60% of free
    RAM, allocated page by page for many seconds), and sizing it for the longest possible request
    at an 8k context asks for tens of GB. Given the same bytes as the engine, both batchers hold
    the same number of tokens; what it was given and what it resolved are in `details["cache"]`."""
    result = SystemResult("hf_cb", LABELS["hf_cb"])
    requests = workload.requests
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.max_new_tokens = max(r.max_tokens for r in requests)
    cache: dict[str, Any] = {}
    try:
        if hasattr(model, "continuous_batching_context_manager"):
            cb, cache = cb_config(model.config, kv_cache_bytes, max_batch_tokens, max_requests)
            delivered, wall, api = _run_manager(model, workload, config, cb, timeout_s, cache)
        else:
            delivered, wall, api = _run_generate_batch(model, workload, config)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.details = {"cache": cache}
        return result
    result.useful_tokens = delivered
    result.wall_s = wall
    result.details = {"api": api, "completed_tokens": delivered,
                      "max_batch_tokens": max_batch_tokens, "max_requests": max_requests,
                      "cache": cache}
    if delivered < workload.requested_tokens:
        result.details["short_by_tokens"] = workload.requested_tokens - delivered
    return result


def cb_config(model_config: Any, kv_cache_bytes: int, max_batch_tokens: int | None,
              max_requests: int | None) -> tuple[Any, dict[str, Any]]:
    """transformers' `ContinuousBatchingConfig` with a cache of `kv_cache_bytes`, and a record of
    what it was given (pages of `page_size` tokens in every layer, in the model's dtype)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from streamer.engine.kv.pool import KVLayout

    page = ContinuousBatchingConfig().page_size
    dtype = getattr(model_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    layout = KVLayout.from_config(model_config, block_size=page, dtype=dtype)
    num_blocks = max(1, kv_cache_bytes // layout.bytes_per_block)
    kwargs: dict[str, Any] = {"use_cuda_graph": False, "page_size": page,
                              "num_blocks": num_blocks}
    if max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = max_batch_tokens
    if max_requests is not None:
        kwargs["max_requests_per_batch"] = max_requests
    given = {"kv_cache_bytes": kv_cache_bytes, "page_size": page, "num_blocks": num_blocks,
             "kv_tokens": num_blocks * page, "bytes_per_page_block": layout.bytes_per_block,
             "dtype": str(dtype).removeprefix("torch."), "max_batch_tokens": max_batch_tokens,
             "max_requests_per_batch": max_requests}
    return ContinuousBatchingConfig(**kwargs), {"given": given}


def _resolved(manager: Any) -> dict[str, Any]:
    """What the manager made of the config once its cache exists (None where it is not exposed)."""
    cfg = getattr(manager, "continuous_batching_config", None)
    processor = getattr(manager, "batch_processor", None)
    cache = getattr(processor, "cache", None)
    tensor = getattr(cache, "cache_tensor", None)
    attn = getattr(getattr(manager, "model", None), "config", None)
    return {
        "num_blocks": getattr(cfg, "num_blocks", None),
        "max_batch_tokens": getattr(cfg, "max_batch_tokens", None),
        "max_requests_per_batch": getattr(cfg, "max_requests_per_batch", None),
        "max_memory_percent": getattr(cfg, "max_memory_percent", None),
        "allow_block_sharing": getattr(cfg, "allow_block_sharing", None),
        "prefix_sharing": getattr(cache, "use_prefix_sharing", None),
        "cache_tensor_bytes": tensor.numel() * tensor.element_size() if tensor is not None
        else None,
        "attn_implementation": getattr(attn, "_attn_implementation", None),
    }


@torch.inference_mode()
def _run_manager(model: Any, workload: Workload, config: Any, cb_config: Any,
                 timeout_s: float, cache: dict[str, Any]) -> tuple[int, float, str]:
    from transformers.generation.continuous_batching.utils import WorkloadHints

    requests = workload.requests
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in requests),
                          max_generated_length=config.max_new_tokens,
                          num_requests=len(requests))
    with model.continuous_batching_context_manager(
            generation_config=config, continuous_batching_config=cb_config,
            block=True, timeout=5, warmup=False, workload_hints=hints) as manager:
        # Warm-up (cache allocation, first kernels) outside the timed window, like the engine's.
        warm = {r.request_id: r.max_tokens for r in warm_up_requests(workload, 4, 4)}
        for r in warm_up_requests(workload, 4, 4):
            manager.add_request(list(r.prompt_ids), request_id=r.request_id,
                                max_new_tokens=r.max_tokens, eos_token_id=-1)
        _collect(manager, warm, time.monotonic() + timeout_s)
        began = time.monotonic()
        for r in requests:
            manager.add_request(list(r.prompt_ids), request_id=r.request_id,
                                max_new_tokens=r.max_tokens, eos_token_id=-1)
        delivered = _collect(manager, {r.request_id: r.max_tokens for r in requests},
                             began + timeout_s)
        wall = time.monotonic() - began
        cache["resolved"] = _resolved(manager)
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
