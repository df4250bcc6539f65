"""Seeded workloads: prompt and output lengths, lanes and send times for N requests.

Every system compared gets the same `Workload`. A prompt is text whose tokenization
(`tokenizer(text)`, exactly what a worker does) has the chosen number of tokens, so the in-process
systems and the fleet behind Kafka run identical token sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from streamer.bench.stats import arrival_offsets

# A small vocabulary of plain words: any byte-level BPE tokenizes them, cut points between words
# round-trip through decode/encode, and the text reads like text in logs.
_WORD_TEXT = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education stream queue worker token batch model
cache layer broker partition offset message reply request
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    request_id: str
    prompt: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    lane: str
    arrival_s: float


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate; equal specs give equal workloads."""

    num_requests: int = 96
    prompt_range: tuple[int, int] = (16, 128)
    output_range: tuple[int, int] = (16, 160)
    fixed: tuple[int, int] | None = None
    """(prompt tokens, output tokens) for every request instead of the ranges."""
    mix: tuple[tuple[str, float], ...] = (("normal", 1.0),)
    rate: float = float("inf")
    """Requests per second; inf sends everything at once (offline)."""
    burstiness: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        lo, hi = self.fixed or (0, 0)
        for name, (a, b) in (("prompt_range", self.prompt_range),
                             ("output_range", self.output_range)):
            if not 1 <= a <= b:
                raise ValueError(f"{name}=({a}, {b}) needs 1 <= low <= high")
        if self.fixed is not None and (lo < 1 or hi < 1):
            raise ValueError(f"fixed={self.fixed}: both lengths must be >= 1")
        if self.num_requests < 1:
            raise ValueError(f"num_requests={self.num_requests} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        return {"num_requests": self.num_requests, "prompt_range": list(self.prompt_range),
                "output_range": list(self.output_range),
                "fixed": list(self.fixed) if self.fixed else None, "mix": dict(self.mix),
                "rate": None if self.rate == float("inf") else self.rate,
                "burstiness": self.burstiness, "seed": self.seed}


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    requests: tuple[BenchRequest, ...]

    @property
    def requested_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    def with_arrivals(self, rate: float, burstiness: float = 1.0) -> Workload:
        """The same requests sent at `rate` (seeded like the original)."""
        rng = random.Random(self.spec.seed + 1)
        offsets = arrival_offsets(len(self.requests), rate, burstiness, rng)
        spec = WorkloadSpec(**{**self.spec.__dict__, "rate": rate, "burstiness": burstiness})
        return Workload(spec, tuple(
            BenchRequest(r.request_id, r.prompt, r.prompt_ids, r.max_tokens, r.lane, t)
            for r, t in zip(self.requests, offsets, strict=True)))


def warm_up_requests(workload: Workload, count: int = 4, max_tokens: int = 8
                     ) -> tuple[BenchRequest, ...]:
    """Short untimed requests shaped like the workload's first ones, with their words (and ids)
    in reverse order: they warm kernels and allocators up but leave no prefix in the KV cache
    that a measured request could reuse (engine, worker and transformers all cache prefixes)."""
    return tuple(
        BenchRequest(f"warmup-{i}-{r.request_id}", " ".join(reversed(r.prompt.split())),
                     tuple(reversed(r.prompt_ids)), min(max_tokens, r.max_tokens), r.lane, 0.0)
        for i, r in enumerate(workload.requests[:count]))


def build_workload(spec: WorkloadSpec, tokenizer: Any | None) -> Workload:
    """Draw lengths, lanes and arrivals from `spec.seed`, and make prompts of those lengths.

    Without a tokenizer (a load generator pointed at a fleet whose model it cannot read) a
    prompt is that many words, which is only roughly that many tokens; `prompt_ids` is then empty.
    """
    spec.validate()
    rng = random.Random(spec.seed)
    lanes, weights = zip(*spec.mix, strict=True)
    requests = []
    offsets = arrival_offsets(spec.num_requests, spec.rate, spec.burstiness,
                              random.Random(spec.seed + 1))
    for i in range(spec.num_requests):
        if spec.fixed is not None:
            prompt_len, out_len = spec.fixed
        else:
            prompt_len = rng.randint(*spec.prompt_range)
            out_len = rng.randint(*spec.output_range)
        lane = rng.choices(lanes, weights)[0]
        if tokenizer is None:
            text = " ".join(rng.choice(_WORDS) for _ in range(prompt_len))
            ids: tuple[int, ...] = ()
        else:
            text, ids = prompt_of_length(tokenizer, prompt_len, rng)
        requests.append(BenchRequest(f"bench-{spec.seed}-{i:05d}", text, ids, out_len, lane,
                                     offsets[i]))
    return Workload(spec, tuple(requests))


def prompt_of_length(tokenizer: Any, length: int, rng: random.Random,
                     attempts: int = 64) -> tuple[str, tuple[int, ...]]:
    """Text whose `tokenizer(text).input_ids` has exactly `length` ids (special tokens included).

    Words are appended until the tokenization is long enough; if it overshoots (a word of several
    tokens), another word is tried in its place. Returns the text and its ids.
    """
    special = len(tokenizer("").input_ids)  # e.g. 1 for a BOS-prepending Llama tokenizer
    if length <= special:
        raise ValueError(f"prompt length {length} leaves no room next to {special} special "
                         "token(s)")
    words: list[str] = []
    count = special
    for _ in range(length * attempts):
        if count == length:
            break
        word = rng.choice(_WORDS)
        candidate = " ".join([*words, word])
        n = len(tokenizer(candidate).input_ids)
        if n <= length:
            words.append(word)
            count = n
    text = " ".join(words)
    ids = tuple(tokenizer(text).input_ids)
    if len(ids) != length:
        raise RuntimeError(f"could not build a prompt of exactly {length} tokens (got {len(ids)})")
    return text, ids
