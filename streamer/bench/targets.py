"""The bars the issues set, and each one's verdict against a run's figures (reported, never
asserted: a benchmark measures, tests do not gate on speed)."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    key: str
    """Name of the measured figure: a ratio `a/b` of useful tokens/s, or a scenario's figure."""
    label: str
    op: str  # ">=" or "<="
    bound: float
    source: str

    def verdict(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {">=": operator.ge, "<=": operator.le}[self.op](value, self.bound)

    def bound_text(self) -> str:
        if abs(self.bound - 1 / 3) < 1e-9:
            bound = "1/3"
        elif float(self.bound).is_integer() and self.bound >= 100:
            bound = f"{int(self.bound):,}"
        else:
            bound = f"{self.bound:g}"
        return f"{self.op} {bound}"


TARGETS: tuple[Target, ...] = (
    Target("fleet/static", "fleet vs static micro-batching (useful tokens/s)", ">=", 2.0, "#13"),
    Target("fleet/hf_cb", "fleet vs transformers continuous batching", ">=", 1.5, "#13"),
    Target("engine/ceiling", "engine vs raw forward-loop ceiling", ">=", 0.85, "#13"),
    Target("kv_tokens_per_gib", "tokens of float32 KV in 1 GiB", ">=", 20_000, "#13"),
    Target("prefix_ttft_ratio", "TTFT with a cached 256-token system prompt / uncached", "<=",
           1 / 3, "#13"),
    Target("fleet/engine", "fleet vs engine in-process (Kafka's cost)", ">=", 0.9, "#3"),
    Target("engine/static", "engine vs static micro-batching", ">=", 1.5, "#3"),
    Target("engine/hf_cb", "engine vs transformers continuous batching", ">=", 1.2, "#3"),
)
BY_KEY = {t.key: t for t in TARGETS}


def evaluate(measured: Mapping[str, float | None], keys: Sequence[str] | None = None
             ) -> list[dict[str, Any]]:
    """One row per target (those in `keys`, in the table's order): measured value and verdict."""
    wanted = set(keys) if keys is not None else set(measured)
    rows = []
    for target in TARGETS:
        if target.key not in wanted:
            continue
        value = measured.get(target.key)
        rows.append({"key": target.key, "label": target.label, "measured": value,
                     "op": target.op, "bound": target.bound, "target": target.bound_text(),
                     "met": target.verdict(value), "source": target.source})
    return rows


def scenario_figures(scenarios: Mapping[str, Any], kv: Mapping[str, Any] | None
                     ) -> dict[str, float | None]:
    """The non-ratio figures the targets name, from a run's scenarios and KV capacity."""
    prefix = scenarios.get("prefix") or {}
    return {"kv_tokens_per_gib": (kv or {}).get("tokens_per_gib"),
            "prefix_ttft_ratio": prefix.get("ttft_ratio")}
