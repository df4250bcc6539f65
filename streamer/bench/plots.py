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


def scenario_plots(out_dir: Path, stem: str, scenarios: Mapping[str, Any]) -> list[Path]:
    """`<stem>-steps.png` and `<stem>-prefix.png` for the scenarios that produced figures."""
    paths = []
    profile = scenarios.get("profile")
    if profile and "error" not in profile and profile["per_step"]:
        paths.append(step_profile(profile, out_dir / f"{stem}-steps.png"))
    prefix = scenarios.get("prefix")
    if prefix and "error" not in prefix:
        paths.append(prefix_ttft(prefix, out_dir / f"{stem}-prefix.png"))
    return paths


def step_profile(profile: Mapping[str, Any], path: Path) -> Path:
    """The profiled pass: tokens per step (prompt vs decode), step time against tokens, and
    where the wall time went, part by part."""
    from streamer.bench.profiler import OVERHEAD_PARTS, PART_SHORT

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = profile["per_step"]
    xs = list(range(len(steps)))
    prefill = [s["prefill_tokens"] for s in steps]
    decode = [s["tokens"] - s["prefill_tokens"] for s in steps]
    axes[0].bar(xs, decode, width=1.0, color="#4c72b0", label="decode tokens")
    axes[0].bar(xs, prefill, width=1.0, bottom=decode, color="#dd8452", label="prompt tokens")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("tokens in the step")
    axes[0].legend(fontsize=8)
    axes[0].set_title("tokens per step")
    mixed = [s for s in steps if s["prefill_tokens"]]
    pure = [s for s in steps if not s["prefill_tokens"]]
    for group, color, label in ((pure, "#4c72b0", "decode only"),
                                (mixed, "#dd8452", "with prompt tokens")):
        axes[1].scatter([s["tokens"] for s in group], [s["ms"] for s in group], s=8,
                        color=color, label=label)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("tokens in the step (log scale)")
    axes[1].set_ylabel("step time (ms)")
    axes[1].set_ylim(bottom=0)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[1].set_title("step time against its tokens")
    parts = list(profile["seconds"])
    shares = [100 * profile["share"][p] for p in parts]
    colors = ["#c44e52" if p == "attention" else "#55a868" if p == "mlp"
              else "#8c8c8c" if p in OVERHEAD_PARTS else "#4c72b0" for p in parts]
    axes[2].barh([PART_SHORT.get(p, p) for p in parts], shares, color=colors)
    for y, share in enumerate(shares):
        axes[2].text(share, y, f" {share:.1f}%", va="center", fontsize=8)
    axes[2].invert_yaxis()
    axes[2].tick_params(axis="y", labelsize=8)
    axes[2].set_xlabel("share of wall time (%)")
    axes[2].set_xlim(0, max([*shares, 1.0]) * 1.25)
    axes[2].set_title("where the time goes (grey: host, Python)")
    return _save(fig, plt, path)


def prefix_ttft(prefix: Mapping[str, Any], path: Path) -> Path:
    """TTFT of each request of the prefix scenario, uncached vs cached, with the 1/3 line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    rows = [r for r in prefix["requests"] if r["kind"] != "primer" and r["ttft_ms"] is not None]
    for kind, color in (("uncached", "#c44e52"), ("cached", "#4c72b0")):
        mine = [r["ttft_ms"] for r in rows if r["kind"] == kind]
        ax.plot(range(1, len(mine) + 1), mine, marker="o", color=color, label=kind)
    cold = (prefix["uncached"]["ttft_ms"] or {}).get("p50")
    if cold:
        ax.axhline(cold / 3, color="#333333", linestyle="--", linewidth=0.8,
                   label="target: 1/3 of uncached p50")
    ax.set_xlabel("pair (uncached and cached requests alternate)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("TTFT (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"shared {prefix['spec']['prefix_tokens']}-token system prompt: TTFT")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
