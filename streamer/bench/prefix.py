"""Shared system prompt: TTFT of requests whose prompt prefix is in the KV cache vs not.

Every request is `system prompt + its own question`. A *primer* computes the shared system prompt
`S0` once (untimed; it also warms up prefill of that length). Then, one at a time, so that TTFT
is the prefill and nothing else: an *uncached* request (a system prompt of its own, never seen,
plus question i) and a *cached* one (`S0` plus the same question i), alternating so that any
drift of the machine hits both kinds alike. The two kinds have identical lengths and identical
questions; only whether the prefix is cached differs. Each request's prefix-cache hit (tokens the
engine found cached, from the block manager's counter) is recorded next to its TTFT, so the
result shows that the cached ones really skipped the prefix and the uncached ones did not.

The figure: median cached TTFT / median uncached TTFT (issue #13's target: <= 1/3).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from streamer.bench.stats import summarize
from streamer.bench.workload import _WORDS, prompt_of_length


@dataclass(frozen=True)
class PrefixSpec:
    """What to run; equal specs (and tokenizers) give equal prompts."""

    pairs: int = 8
    """Uncached/cached request pairs (after the untimed primer)."""
    prefix_tokens: int = 256
    """Length of the shared system prompt (a multiple of the block size is cached whole)."""
    suffix_range: tuple[int, int] = (16, 32)
    """Tokens of each request's own question, after the system prompt."""
    max_tokens: int = 8
    """Completion tokens per request (TTFT needs one; a few make it a normal request)."""
    seed: int = 0

    def validate(self) -> None:
        lo, hi = self.suffix_range
        if self.pairs < 1 or self.prefix_tokens < 2 or self.max_tokens < 1 or not 1 <= lo <= hi:
            raise ValueError(f"PrefixSpec {self}: need pairs >= 1, prefix_tokens >= 2, "
                             "max_tokens >= 1 and 1 <= suffix low <= high")

    def to_json(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "prefix_tokens": self.prefix_tokens,
                "suffix_range": list(self.suffix_range), "max_tokens": self.max_tokens,
                "seed": self.seed}


@dataclass(frozen=True)
class PrefixRequest:
    kind: str  # "primer" | "uncached" | "cached"
    prompt_ids: tuple[int, ...]


def build_prefix_requests(spec: PrefixSpec, tokenizer: Any) -> list[PrefixRequest]:
    """Primer, then (uncached i, cached i) for each pair, as token ids."""
    spec.validate()
    rng = random.Random(spec.seed)
    shared = _system_prompt(tokenizer, spec.prefix_tokens, rng)
    out = [PrefixRequest("primer", shared + _question(tokenizer, spec.suffix_range[0], rng))]
    for _ in range(spec.pairs):
        question = _question(tokenizer, rng.randint(*spec.suffix_range), rng)
        own = _system_prompt(tokenizer, spec.prefix_tokens, rng)
        out.append(PrefixRequest("uncached", own + question))
        out.append(PrefixRequest("cached", shared + question))
    return out


def _system_prompt(tokenizer: Any, length: int, rng: random.Random) -> tuple[int, ...]:
    """Exactly `length` ids, as `tokenizer(text)` gives them (special tokens included)."""
    return prompt_of_length(tokenizer, length, rng)[1]


def _question(tokenizer: Any, length: int, rng: random.Random) -> tuple[int, ...]:
    """`length` ids of plain words, without special tokens (it follows the system prompt)."""
    ids: list[int] = []
    while len(ids) < length:
        text = " " + " ".join(rng.choice(_WORDS) for _ in range(length + 4))
        ids += tokenizer(text, add_special_tokens=False).input_ids
    return tuple(ids[:length])


async def run_prefix(engine: Any, spec: PrefixSpec, tokenizer: Any) -> dict[str, Any]:
    """Run the requests one after another on a started engine; TTFT per request and summary."""
    from streamer.engine.outputs import OutputKind
    from streamer.engine.sequence import SamplingParams

    rows = []
    for index, request in enumerate(build_prefix_requests(spec, tokenizer)):
        hits_before = _hit_tokens(engine)
        began = time.monotonic()
        first: float | None = None
        stream = engine.add(f"prefix-{spec.seed}-{index:04d}", list(request.prompt_ids),
                            SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True))
        async for out in stream:
            if out.kind is OutputKind.TOKENS and out.token_ids and first is None:
                first = time.monotonic()
            elif out.kind is OutputKind.FINISHED and out.error is not None:
                raise RuntimeError(f"prefix request {index} failed: {out.error}")
        done = time.monotonic()
        hits_after = _hit_tokens(engine)
        rows.append({"kind": request.kind, "prompt_tokens": len(request.prompt_ids),
                     "ttft_ms": 1000 * (first - began) if first is not None else None,
                     "e2e_ms": 1000 * (done - began),
                     "cached_tokens": (hits_after - hits_before
                                       if hits_before is not None and hits_after is not None
                                       else None)})
    return summarize_prefix(rows, spec)


def _hit_tokens(engine: Any) -> int | None:
    blocks = getattr(engine, "blocks", None)
    stats = getattr(blocks, "stats", None)
    return getattr(stats, "hit_tokens", None)


def summarize_prefix(rows: list[dict[str, Any]], spec: PrefixSpec) -> dict[str, Any]:
    """Per kind: TTFT summary (ms) and cached tokens; the cached/uncached ratio of medians."""
    kinds: dict[str, Any] = {}
    for kind in ("uncached", "cached"):
        mine = [r for r in rows if r["kind"] == kind]
        ttft = summarize(r["ttft_ms"] for r in mine if r["ttft_ms"] is not None)
        hits = [r["cached_tokens"] for r in mine if r["cached_tokens"] is not None]
        kinds[kind] = {"requests": len(mine), "ttft_ms": ttft.to_json() if ttft else None,
                       "mean_cached_tokens": sum(hits) / len(hits) if hits else None,
                       "mean_prompt_tokens": (sum(r["prompt_tokens"] for r in mine) / len(mine)
                                              if mine else None)}
    cold, warm = kinds["uncached"]["ttft_ms"], kinds["cached"]["ttft_ms"]
    ratio = warm["p50"] / cold["p50"] if cold and warm and cold["p50"] > 0 else None
    return {"spec": spec.to_json(), "ttft_ratio": ratio, **kinds, "requests": rows}
