"""What one system's run produced, in one shape for every system compared."""

from __future__ import annotations

import contextlib
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from streamer.bench.stats import RequestTiming

LABELS = {
    "ceiling": "raw forward loop (ceiling)",
    "engine": "engine in-process",
    "fleet": "fleet via Kafka (1 worker)",
    "static": "static micro-batching",
    "hf_cb": "transformers continuous batching",
}


@dataclass
class SystemResult:
    """Useful tokens/s of one system on one workload, or the error that stopped it."""

    name: str
    label: str
    useful_tokens: int = 0
    wall_s: float = 0.0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timings: list[RequestTiming] = field(default_factory=list)
    """Per-request client-side timings, where the system exposes them (engine, fleet)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s > 0

    @property
    def tokens_per_s(self) -> float | None:
        return self.useful_tokens / self.wall_s if self.ok else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "useful_tokens": self.useful_tokens,
                "wall_s": self.wall_s, "useful_tokens_per_s": self.tokens_per_s,
                "error": self.error, "details": self.details}


def ratio(a: SystemResult | None, b: SystemResult | None) -> float | None:
    """a's useful tokens/s over b's; None when either did not produce a figure."""
    if a is None or b is None or a.tokens_per_s is None or not b.tokens_per_s:
        return None
    return a.tokens_per_s / b.tokens_per_s


def machine_info() -> dict[str, Any]:
    """Enough about the machine and libraries to tell whether two result files are comparable."""
    import os

    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info
