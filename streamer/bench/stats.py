"""The benchmark's arithmetic: percentiles, per-request latencies, goodput, arrival times.

Pure functions on plain numbers (no asyncio, Kafka or torch), so every figure the benchmarks
print can be unit-tested on synthetic timestamps.

Definitions (client side, seconds):

* TTFT: first token received - request submitted.
* e2e: outcome received - request submitted.
* TPOT: (e2e - TTFT) / (tokens - 1); undefined for a one-token completion.
* ITL: the gaps between successive token *chunks* received (a worker may coalesce several tokens
  into one chunk when its consumer falls behind, so a chunk, not a token, is what a client sees
  arrive; `chunks` next to `tokens` in the results shows how often that happened).
* Useful tokens/s: completion tokens that requests asked for and got / wall time from the first
  request submitted to the last outcome received (DECISIONS.md, "How performance is measured").
* Goodput: completed requests that met every SLO, per second of the same wall time.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from streamer.protocol import PRIORITIES

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be within [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Summary:
    """Mean and the usual percentiles of one metric, in the metric's unit."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    def to_json(self, scale: float = 1.0) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean * scale, "p50": self.p50 * scale,
                "p90": self.p90 * scale, "p99": self.p99 * scale}


def summarize(values: Iterable[float]) -> Summary | None:
    """Summary of `values`, or None when there are none (a lane with no requests, say)."""
    data = list(values)
    if not data:
        return None
    return Summary(len(data), sum(data) / len(data), *(percentile(data, q) for q in PERCENTILES))


@dataclass
class RequestTiming:
    """What a client saw of one request: when it was sent and when each chunk and the outcome came.

    Times are seconds on one monotonic clock; `chunks` holds (arrival time, tokens in the chunk).
    """

    request_id: str
    lane: str
    submitted: float
    requested_tokens: int
    chunks: list[tuple[float, int]] = field(default_factory=list)
    finished: float | None = None
    ok: bool = False
    outcome: str = ""

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.submitted if self.chunks else None

    @property
    def e2e(self) -> float | None:
        return self.finished - self.submitted if self.finished is not None else None

    @property
    def tpot(self) -> float | None:
        return tpot(self.e2e, self.ttft, self.tokens)

    @property
    def itls(self) -> list[float]:
        return inter_chunk_gaps([t for t, _ in self.chunks])


def tpot(e2e: float | None, ttft: float | None, tokens: int) -> float | None:
    """Time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
    if e2e is None or ttft is None or tokens < 2:
        return None
    return (e2e - ttft) / (tokens - 1)


def inter_chunk_gaps(arrivals: Sequence[float]) -> list[float]:
    """Gaps between successive chunk arrivals (the ITL samples of one request)."""
    return [b - a for a, b in itertools.pairwise(arrivals)]


# ------------------------------------------------------------------------------------ SLOs


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")


def parse_duration(text: str) -> float:
    """'500ms' / '0.5s' / '0.5' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 500ms or 0.5s")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=500ms,tpot=50ms' -> {'ttft': 0.5, 'tpot': 0.05} (seconds)."""
    slo: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO item {part!r}: expected <metric>=<duration> with metric in "
                             f"{SLO_METRICS}")
        slo[name] = parse_duration(value)
    return slo


def meets_slo(timing: RequestTiming, slo: Mapping[str, float]) -> bool:
    """A completed request meets the SLO when each named latency is within its bound.

    ITL is judged by the request's worst gap; a metric that is undefined for the request (TPOT of
    a one-token completion) does not count against it.
    """
    if not timing.ok:
        return False
    values = {"ttft": timing.ttft, "tpot": timing.tpot, "e2e": timing.e2e,
              "itl": max(timing.itls) if timing.itls else None}
    return all(values[name] is None or values[name] <= bound  # type: ignore[operator]
               for name, bound in slo.items())


# ------------------------------------------------------------------------------ aggregates


@dataclass(frozen=True)
class Aggregate:
    """Every metric over one set of requests (the whole run, or one lane)."""

    requests: int
    completed: int
    duration_s: float
    output_tokens: int
    useful_tokens: int
    request_throughput: float
    output_tokens_per_s: float
    useful_tokens_per_s: float
    goodput: float | None
    slo_attainment: float | None
    ttft: Summary | None
    tpot: Summary | None
    itl: Summary | None
    e2e: Summary | None
    chunks: int

    def to_json(self) -> dict[str, object]:
        ms = 1000.0
        return {
            "requests": self.requests, "completed": self.completed,
            "duration_s": self.duration_s, "output_tokens": self.output_tokens,
            "useful_tokens": self.useful_tokens, "chunks": self.chunks,
            "request_throughput": self.request_throughput,
            "output_tokens_per_s": self.output_tokens_per_s,
            "useful_tokens_per_s": self.useful_tokens_per_s,
            "goodput": self.goodput, "slo_attainment": self.slo_attainment,
            **{f"{name}_ms": (s.to_json(ms) if s else None) for name, s in
               (("ttft", self.ttft), ("tpot", self.tpot), ("itl", self.itl), ("e2e", self.e2e))},
        }


def aggregate(timings: Sequence[RequestTiming], duration_s: float,
              slo: Mapping[str, float] | None = None) -> Aggregate:
    """Throughput, goodput and latency summaries of `timings` over `duration_s` of wall time.

    Useful tokens are capped at what each completed request asked for, so a duplicate or
    over-long stream never inflates the figure.
    """
    done = [t for t in timings if t.ok]
    duration = max(duration_s, 1e-9)
    output = sum(t.tokens for t in done)
    useful = sum(min(t.tokens, t.requested_tokens) for t in done)
    good = sum(meets_slo(t, slo) for t in done) if slo else None
    return Aggregate(
        requests=len(timings), completed=len(done), duration_s=duration_s,
        output_tokens=output, useful_tokens=useful,
        request_throughput=len(done) / duration, output_tokens_per_s=output / duration,
        useful_tokens_per_s=useful / duration,
        goodput=good / duration if good is not None else None,
        slo_attainment=(good / len(timings) if timings else 0.0) if good is not None else None,
        ttft=summarize(v for t in done if (v := t.ttft) is not None),
        tpot=summarize(v for t in done if (v := t.tpot) is not None),
        itl=summarize(gap for t in done for gap in t.itls),
        e2e=summarize(v for t in done if (v := t.e2e) is not None),
        chunks=sum(len(t.chunks) for t in done),
    )


def per_lane(timings: Sequence[RequestTiming], duration_s: float,
             slo: Mapping[str, float] | None = None) -> dict[str, Aggregate]:
    """`aggregate` for each lane that has requests, in priority order."""
    lanes = [lane for lane in PRIORITIES if any(t.lane == lane for t in timings)]
    return {lane: aggregate([t for t in timings if t.lane == lane], duration_s, slo)
            for lane in lanes}


def run_window(timings: Sequence[RequestTiming]) -> float:
    """Wall time from the first submission to the last outcome (0 if nothing finished)."""
    finished = [t.finished for t in timings if t.finished is not None]
    if not timings or not finished:
        return 0.0
    return max(finished) - min(t.submitted for t in timings)


# ------------------------------------------------------------------------------- arrivals


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0,
                    rng: random.Random | None = None) -> list[float]:
    """Send times (seconds from the start) of `n` requests.

    rate = inf: all at once (offline). Otherwise gaps are Gamma(shape=burstiness,
    scale=1/(rate*burstiness)): mean 1/rate whatever the burstiness; burstiness 1 is a Poisson
    process, below 1 burstier, above 1 more regular. The first request goes at 0.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate={rate} and burstiness={burstiness} must be > 0")
    rng = rng or random.Random(0)
    scale = 1.0 / (rate * burstiness)
    offsets, now = [], 0.0
    for i in range(n):
        if i:
            now += rng.gammavariate(burstiness, scale)
        offsets.append(now)
    return offsets


def parse_mix(text: str) -> dict[str, float]:
    """'urgent=0.05,high=0.15,normal=0.5,low=0.3' -> weights normalised to sum 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        lane, sep, value = part.partition("=")
        lane = lane.strip()
        if not sep or lane not in PRIORITIES:
            raise ValueError(f"mix item {part!r}: expected <lane>=<weight> with lane in "
                             f"{PRIORITIES}")
        weight = float(value)
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"mix weight for {lane} must be a finite number >= 0, got {value!r}")
        weights[lane] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix {text!r} has no positive weight")
    return {lane: w / total for lane, w in weights.items() if w > 0}


def cut_batches(arrivals: Sequence[float], max_batch: int, window_s: float) -> list[list[int]]:
    """Static micro-batching: indices in arrival order, cut when a batch holds `max_batch`
    requests or `window_s` has passed since its first request arrived."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if (current is None or len(current) >= max_batch
                or arrivals[i] - arrivals[current[0]] > window_s):
            batches.append([i])
        else:
            current.append(i)
    return batches
