"""The raw forward-loop ceiling: the checkpoint's own forward, a static KV cache, no scheduling.

B sequences of one prompt length are prefilled in one forward, then decode the same number of
steps together, greedy, with no padding, no per-request bookkeeping and no early finishers. Tokens
counted: B x steps (prefill time is included in the wall time but its tokens are not counted,
like the prompt tokens of real requests). The best of a few batch sizes is the ceiling that an
engine on this model and machine can hope to approach.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from streamer.bench.results import LABELS, SystemResult


def run_ceiling(model: Any, *, prompt_len: int, steps: int,
                batch_sizes: Sequence[int] = (16, 32, 64), seed: int = 0) -> SystemResult:
    """Try each batch size once; the result is the best, every trial is in `details`."""
    result = SystemResult("ceiling", LABELS["ceiling"])
    trials = []
    try:
        _decode_loop(model, min(batch_sizes), prompt_len, 4, seed)  # warm-up, not timed
        for batch in batch_sizes:
            tokens, seconds = _decode_loop(model, batch, prompt_len, steps, seed)
            trials.append({"batch_size": batch, "tokens": tokens, "wall_s": seconds,
                           "tokens_per_s": tokens / seconds})
    except Exception as exc:  # a benchmark records a failing system, it does not crash
        result.error = f"{type(exc).__name__}: {exc}"
    if trials:
        best = max(trials, key=lambda t: t["tokens_per_s"])
        result.useful_tokens, result.wall_s = best["tokens"], best["wall_s"]
        result.details = {"best_batch_size": best["batch_size"], "trials": trials,
                          "prompt_len": prompt_len, "steps": steps, "cache": "StaticCache"}
    return result


@torch.inference_mode()
def _decode_loop(model: Any, batch: int, prompt_len: int, steps: int,
                 seed: int) -> tuple[int, float]:
    from transformers import StaticCache

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    # Ids above the special tokens; the values do not matter, the shapes do.
    ids = torch.randint(8, vocab, (batch, prompt_len), generator=gen)
    began = time.perf_counter()
    # Allocated inside the timed region: a real engine pays for its cache too (once, up front).
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps)
    # The cache tracks its own length, so each call continues where the previous one ended.
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(1, steps):
        out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps, time.perf_counter() - began
