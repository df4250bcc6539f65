"""The pure part of tuning: which knobs and values, trial order, and when a change is adopted.

A candidate is adopted only when its goodput beats the current config's by more than the
threshold (default 5%) *and* by more than the noise measured in the same run: the spread between
repeats of either arm. So on a machine whose run-to-run noise is 15%, a 10% "gain" is not taken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

# Values tried per knob (the current value is always the baseline). Targets: "engine" runs the
# engine in-process; "fleet" runs one worker behind the embedded broker.
KNOBS: dict[str, tuple[Any, ...]] = {
    "max_num_seqs": (32, 64, 128, 256),
    "max_num_batched_tokens": (256, 512, 1024, 2048),
    "block_size": (16, 32),
    "torch_threads": (1, 2),
    "devices": ("cpu", "cpu,cpu"),  # pipeline stages
    "chunk_ms": (0.0, 20.0, 50.0, 100.0),  # fleet only
    "chunk_records_per_s": (0.0, 25.0, 50.0, 100.0),  # fleet only
}
FLEET_ONLY = frozenset({"chunk_ms", "chunk_records_per_s"})
DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class Verdict:
    adopt: bool
    gain: float
    """mean(candidate) / mean(baseline) - 1."""
    noise: float
    """The larger relative spread (max - min) / mean of the two arms' repeats."""
    reason: str


def spread(values: Sequence[float]) -> float:
    mean = fmean(values)
    return (max(values) - min(values)) / mean if mean > 0 and len(values) > 1 else 0.0


def decide(baseline: Sequence[float], candidate: Sequence[float],
           threshold: float = DEFAULT_THRESHOLD) -> Verdict:
    """Adopt `candidate` only if it beats `baseline` by more than `threshold` and the noise."""
    if not baseline or not candidate:
        return Verdict(False, 0.0, 0.0, "no measurement")
    base = fmean(baseline)
    if base <= 0:
        adopt = fmean(candidate) > 0
        return Verdict(adopt, float("inf") if adopt else 0.0, 0.0,
                       "the baseline met no SLO" if adopt else "neither met the SLO")
    gain = fmean(candidate) / base - 1
    noise = max(spread(baseline), spread(candidate))
    if gain <= threshold:
        return Verdict(False, gain, noise, f"gain {gain:+.1%} is not above {threshold:.0%}")
    if gain <= noise:
        return Verdict(False, gain, noise, f"gain {gain:+.1%} is within the noise {noise:.1%}")
    return Verdict(True, gain, noise, f"gain {gain:+.1%} beats {threshold:.0%} and "
                   f"noise {noise:.1%}")


def arm_order(repeats: int) -> list[str]:
    """ABBA ABBA ...: a drift of the machine over the trial hits both arms alike."""
    return [arm for i in range(repeats) for arm in (("A", "B") if i % 2 == 0 else ("B", "A"))]


def candidates(knobs: Mapping[str, Sequence[Any]], current: Mapping[str, Any]
               ) -> list[tuple[str, Any]]:
    """(knob, value) pairs to try, in knob order, skipping each knob's current value."""
    return [(name, value) for name, values in knobs.items() for value in values
            if not _same(value, current.get(name))]


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: ",".join(v) if isinstance(v, tuple | list) else v  # noqa: E731
    return bool(norm(a) == norm(b))


def parse_knobs(text: str | None, target: str) -> dict[str, tuple[Any, ...]]:
    """`max_num_seqs=32/64/128,block_size=16/32` (or just names) -> knob values to try."""
    if not text:
        return {k: v for k, v in KNOBS.items() if target == "fleet" or k not in FLEET_ONLY}
    out: dict[str, tuple[Any, ...]] = {}
    for part in text.split(","):
        name, _, values = part.strip().partition("=")
        if name not in KNOBS:
            raise ValueError(f"knob {name!r}: expected one of {', '.join(KNOBS)}")
        if name in FLEET_ONLY and target != "fleet":
            raise ValueError(f"knob {name!r} applies to --target fleet only")
        if not values:
            out[name] = KNOBS[name]
            continue
        kind = type(KNOBS[name][0])
        out[name] = tuple(kind(v) for v in values.split("/") if v)
    return out
