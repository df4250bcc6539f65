"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from streamer.bench.results import SystemResult
from streamer.bench.stats import RequestTiming
from streamer.protocol import PRIORITIES

DPI = 80  # small files: the docs keep copies


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_bars(systems: Sequence[SystemResult], path: Path, title: str) -> Path:
    """Useful tokens/s per system; a failed system gets an empty bar labelled with 'failed'."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [s.label for s in systems]
    values = [s.tokens_per_s or 0.0 for s in systems]
    bars = ax.barh(labels, values, color=["#4c72b0" if s.ok else "#cccccc" for s in systems])
    for bar, system in zip(bars, systems, strict=True):
        text = (f"{system.tokens_per_s:.0f}" if system.ok
                else "skipped" if system.error and system.error.startswith("skipped") else "failed")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("useful tokens/s (higher is better)")
    ax.set_title(title)
    ax.set_xlim(0, max([*values, 1.0]) * 1.2)
    return _save(fig, plt, path)


def latency_cdfs(series: Mapping[str, Sequence[RequestTiming]], path: Path) -> Path:
    """CDFs of TTFT and e2e latency (ms) for each system that has per-request timings."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("ttft", "e2e"), strict=True):
        for name, timings in series.items():
            values = sorted(1000 * v for t in timings if t.ok
                            and (v := getattr(t, metric)) is not None)
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=name)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency CDFs (offline workload, all requests sent at once)")
    return _save(fig, plt, path)


def lane_ttft(series: Mapping[str, Sequence[RequestTiming]], path: Path) -> Path:
    """TTFT p50 and p90 per priority lane, for each system, under the workload's lane mix."""
    from streamer.bench.stats import percentile

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = list(series)
    width = 0.8 / max(1, 2 * len(names))
    lanes = [lane for lane in PRIORITIES
             if any(t.lane == lane for timings in series.values() for t in timings)]
    for k, name in enumerate(names):
        for j, q in enumerate((50, 90)):
            values = []
            for lane in lanes:
                ttfts = [1000 * v for t in series[name] if t.lane == lane and t.ok
                         and (v := t.ttft) is not None]
                values.append(percentile(ttfts, q) if ttfts else 0.0)
            offset = (2 * k + j) * width - 0.4 + width / 2
            ax.bar([i + offset for i in range(len(lanes))], values, width,
                   label=f"{name} p{q}", alpha=1.0 if j == 0 else 0.55)
    ax.set_xticks(range(len(lanes)), lanes)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT per priority lane")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def latency_throughput(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The rate sweep: latency (TTFT p50/p99, TPOT p50) against achieved output tokens/s."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [p["output_tokens_per_s"] for p in points]
    for key, label in (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99")):
        axes[0].plot(xs, [p[key] for p in points], marker="o", label=label)
    axes[1].plot(xs, [p["tpot_p50_ms"] for p in points], marker="o", label="TPOT p50")
    for point, x in zip(points, xs, strict=True):
        axes[0].annotate(f"{point['rate']:.3g}/s", (x, point["ttft_p50_ms"]), fontsize=7)
    for ax, ylabel in zip(axes, ("TTFT (ms)", "TPOT (ms)"), strict=True):
        ax.set_xlabel("output tokens/s achieved")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fleet through Kafka: latency vs throughput (Poisson arrivals, rate annotated)")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
