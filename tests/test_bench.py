"""`streamer bench`: the arithmetic on synthetic timestamps, and smoke runs of serve and compare.

No speed thresholds anywhere: the smoke runs check that a run completes and writes valid files.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from streamer.bench import report
from streamer.bench.results import SystemResult, ratio
from streamer.bench.serve import _spread
from streamer.bench.stats import (
    RequestTiming,
    aggregate,
    arrival_offsets,
    cut_batches,
    inter_chunk_gaps,
    meets_slo,
    parse_duration,
    parse_mix,
    parse_slo,
    per_lane,
    percentile,
    run_window,
    summarize,
    tpot,
)
from streamer.bench.workload import WorkloadSpec, build_workload
from streamer.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def timing(submitted: float, chunks: list[tuple[float, int]], finished: float | None, *,
           lane: str = "normal", requested: int | None = None, ok: bool = True) -> RequestTiming:
    tokens = sum(n for _, n in chunks)
    return RequestTiming("r", lane, submitted, requested if requested is not None else tokens,
                         chunks, finished, ok, "completed" if ok else "failed")


# ------------------------------------------------------------------------------ percentiles


def test_percentile_interpolates_like_numpy() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize(float(v) for v in range(1, 101))
    assert s is not None
    assert (s.count, s.mean, s.p50) == (100, 50.5, 50.5)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert summarize([]) is None
    assert s.to_json(1000)["p50"] == 50500.0


# ------------------------------------------------------------------------ per-request latency


def test_request_latencies_from_timestamps() -> None:
    # Sent at 10.0; chunks of 1, 1 and 2 tokens at 10.2, 10.25, 10.4; outcome at 10.5.
    t = timing(10.0, [(10.2, 1), (10.25, 1), (10.4, 2)], 10.5)
    assert t.tokens == 4
    assert t.ttft == pytest.approx(0.2)
    assert t.e2e == pytest.approx(0.5)
    assert t.tpot == pytest.approx((0.5 - 0.2) / 3)
    assert t.itls == pytest.approx([0.05, 0.15])


def test_tpot_undefined_without_a_second_token() -> None:
    assert tpot(1.0, 0.5, 1) is None
    assert tpot(None, 0.5, 3) is None
    assert tpot(1.0, None, 3) is None
    assert tpot(1.0, 0.4, 4) == pytest.approx(0.2)
    assert timing(0.0, [], None).ttft is None
    assert inter_chunk_gaps([1.0]) == []


def test_slo_parsing() -> None:
    assert parse_slo("ttft=500ms,tpot=50ms") == {"ttft": 0.5, "tpot": 0.05}
    assert parse_slo("e2e=2s, itl=0.1") == {"e2e": 2.0, "itl": 0.1}
    assert parse_slo("") == {}
    assert parse_duration("1.5ms") == pytest.approx(0.0015)
    for bad in ("ttft", "speed=5ms", "ttft=fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_meets_slo() -> None:
    slo = {"ttft": 0.5, "tpot": 0.05}
    fast = timing(0.0, [(0.1, 1), (0.12, 1), (0.14, 1)], 0.14)
    slow_first = timing(0.0, [(0.6, 1), (0.61, 1)], 0.61)
    slow_tokens = timing(0.0, [(0.1, 1), (0.3, 1)], 0.3)
    one_token = timing(0.0, [(0.2, 1)], 0.2)  # no TPOT: not held against it
    failed = timing(0.0, [(0.1, 1)], 0.1, ok=False)
    assert meets_slo(fast, slo)
    assert not meets_slo(slow_first, slo)
    assert not meets_slo(slow_tokens, slo)
    assert meets_slo(one_token, slo)
    assert not meets_slo(failed, slo)
    assert not meets_slo(fast, {"itl": 0.015})  # worst gap 0.02


def test_aggregate_throughput_goodput_and_useful_tokens() -> None:
    timings = [
        timing(0.0, [(0.1, 1), (0.2, 1), (0.3, 1), (0.4, 1)], 0.4),  # meets the SLO
        timing(0.0, [(0.9, 1), (1.0, 1)], 1.0),  # TTFT 0.9 s: misses it
        # Asked for 2, got 3 (say a duplicate chunk): useful tokens are capped at what it asked.
        timing(0.5, [(0.6, 2), (0.7, 1)], 0.7, requested=2),
        timing(0.5, [], None, ok=False),  # failed: not completed, no tokens
    ]
    duration = run_window(timings)
    assert duration == pytest.approx(1.0)
    agg = aggregate(timings, duration, {"ttft": 0.5})
    assert (agg.requests, agg.completed) == (4, 3)
    assert agg.output_tokens == 9
    assert agg.useful_tokens == 8
    assert agg.useful_tokens_per_s == pytest.approx(8.0)
    assert agg.request_throughput == pytest.approx(3.0)
    assert agg.goodput == pytest.approx(2.0)
    assert agg.slo_attainment == pytest.approx(0.5)
    assert agg.ttft is not None and agg.ttft.p50 == pytest.approx(0.1)
    assert agg.chunks == 8
    payload = agg.to_json()
    assert payload["ttft_ms"]["p50"] == pytest.approx(100.0)  # type: ignore[index]
    json.dumps(payload)
    assert aggregate(timings, duration).goodput is None


def test_per_lane_keeps_priority_order() -> None:
    timings = [timing(0.0, [(0.3, 1)], 0.3, lane="low"),
               timing(0.0, [(0.1, 1)], 0.1, lane="urgent")]
    lanes = per_lane(timings, 1.0)
    assert list(lanes) == ["urgent", "low"]
    assert lanes["low"].ttft is not None and lanes["low"].ttft.mean == pytest.approx(0.3)
    assert run_window([]) == 0.0


def test_spread_keeps_token_total_and_chunk_times() -> None:
    assert _spread([1.0, 2.0, 3.0], 3) == [(1.0, 1), (2.0, 1), (3.0, 1)]
    assert _spread([1.0, 2.0], 5) == [(1.0, 1), (2.0, 4)]
    assert _spread([], 3) == []


# ---------------------------------------------------------------------------------- arrivals


def test_offline_arrivals_are_all_at_zero() -> None:
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(0, 3.0) == []


def test_poisson_arrivals_have_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, rate=20.0, burstiness=1.0, rng=random.Random(1))
    gaps = inter_chunk_gaps(offsets)
    assert offsets[0] == 0.0
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.06)
    # Exponential gaps: the coefficient of variation is 1.
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.08)


def test_burstiness_changes_variance_not_mean() -> None:
    bursty = inter_chunk_gaps(arrival_offsets(4000, 10.0, 0.25, random.Random(2)))
    regular = inter_chunk_gaps(arrival_offsets(4000, 10.0, 4.0, random.Random(2)))
    for gaps in (bursty, regular):
        assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.1)
    cv = [statistics.pstdev(g) / statistics.fmean(g) for g in (bursty, regular)]
    assert cv[0] == pytest.approx(2.0, rel=0.15)  # CV of Gamma(k) is 1/sqrt(k)
    assert cv[1] == pytest.approx(0.5, rel=0.15)


def test_arrivals_are_seeded_and_validated() -> None:
    a = arrival_offsets(10, 5.0, 1.0, random.Random(7))
    assert a == arrival_offsets(10, 5.0, 1.0, random.Random(7))
    assert a != arrival_offsets(10, 5.0, 1.0, random.Random(8))
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0)


def test_parse_mix_normalises() -> None:
    mix = parse_mix("urgent=0.05,high=0.15,normal=0.5,low=0.3")
    assert mix == pytest.approx({"urgent": 0.05, "high": 0.15, "normal": 0.5, "low": 0.3})
    assert parse_mix("high=1,low=3,urgent=0") == {"high": 0.25, "low": 0.75}
    for bad in ("vip=1", "high", "high=-1", "high=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_cut_batches_by_size_and_window() -> None:
    assert cut_batches([0.0] * 5, max_batch=2, window_s=0.01) == [[0, 1], [2, 3], [4]]
    # Arrival order, not index order; a batch closes 10 ms after its first arrival.
    arrivals = [0.0, 0.005, 0.030, 0.012, 0.034]
    assert cut_batches(arrivals, max_batch=32, window_s=0.01) == [[0, 1], [3], [2, 4]]
    with pytest.raises(ValueError):
        cut_batches([0.0], 0, 0.01)


# ---------------------------------------------------------------------------------- workload


def test_workload_is_seeded_with_exact_prompt_lengths(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = WorkloadSpec(num_requests=12, prompt_range=(4, 40), output_range=(3, 9),
                        mix=tuple(parse_mix("high=1,low=1").items()), seed=3)
    first, again = build_workload(spec, tokenizer), build_workload(spec, tokenizer)
    assert first == again
    assert first != build_workload(WorkloadSpec(**{**spec.__dict__, "seed": 4}), tokenizer)
    for r in first.requests:
        assert 4 <= len(r.prompt_ids) <= 40 and 3 <= r.max_tokens <= 9
        assert tuple(tokenizer(r.prompt).input_ids) == r.prompt_ids  # what a worker will run
        assert r.lane in ("high", "low") and r.arrival_s == 0.0
    assert len({r.request_id for r in first.requests}) == 12
    fixed = build_workload(WorkloadSpec(num_requests=3, fixed=(9, 5)), tokenizer)
    assert {(len(r.prompt_ids), r.max_tokens) for r in fixed.requests} == {(9, 5)}
    paced = first.with_arrivals(rate=50.0)
    assert paced.requests[0].arrival_s == 0.0 < paced.requests[-1].arrival_s
    assert [r.prompt_ids for r in paced.requests] == [r.prompt_ids for r in first.requests]


def test_workload_without_tokenizer_uses_words() -> None:
    w = build_workload(WorkloadSpec(num_requests=2, fixed=(7, 3)), None)
    assert all(len(r.prompt.split()) == 7 and r.prompt_ids == () for r in w.requests)


# ------------------------------------------------------------------------------------ report


def test_ratios_and_tables() -> None:
    fast = SystemResult("fleet", "fleet", useful_tokens=300, wall_s=1.0)
    slow = SystemResult("static", "static", useful_tokens=100, wall_s=1.0)
    broken = SystemResult("hf_cb", "hf", error="RuntimeError: no CPU kernel")
    systems = {"fleet": fast, "static": slow, "hf_cb": broken}
    measured = report.ratios(systems, ["fleet/static", "fleet/hf_cb"])
    assert measured == {"fleet/static": pytest.approx(3.0), "fleet/hf_cb": None}
    assert ratio(fast, None) is None
    table = report.ratios_table(measured)
    assert "| fleet/static | 3.00 | >= 2 | met |" in table
    assert "| fleet/hf_cb | - |" in table
    assert "no CPU kernel" in report.systems_table([fast, slow, broken])


def test_targets_are_evaluated_against_their_bounds() -> None:
    from streamer.bench.targets import evaluate, scenario_figures

    measured = {"fleet/static": 2.4, "fleet/hf_cb": 1.1, "engine/ceiling": None,
                **scenario_figures({"prefix": {"ttft_ratio": 0.25}}, {"tokens_per_gib": 23_296})}
    rows = {r["key"]: r for r in evaluate(measured)}
    assert list(rows) == ["fleet/static", "fleet/hf_cb", "engine/ceiling", "kv_tokens_per_gib",
                          "prefix_ttft_ratio"]  # the table's order, only what was measured
    assert [rows[k]["met"] for k in rows] == [True, False, None, True, True]
    assert rows["prefix_ttft_ratio"]["target"] == "<= 1/3"
    assert rows["kv_tokens_per_gib"]["target"] == ">= 20,000"
    table = report.targets_table(list(rows.values()))
    assert "| 2.40 | >= 2 | met | #13 |" in table
    assert "| 1.10 | >= 1.5 | **missed** |" in table
    assert "| - (not measured) | >= 0.85 | - |" in table
    assert "| 23,296 | >= 20,000 | met |" in table
    assert [r["key"] for r in evaluate(measured, ["prefix_ttft_ratio"])] == ["prefix_ttft_ratio"]


def test_prefix_requests_share_exactly_the_system_prompt(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from streamer.bench.prefix import PrefixSpec, build_prefix_requests, summarize_prefix

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = PrefixSpec(pairs=3, prefix_tokens=64, suffix_range=(5, 9), seed=2)
    requests = build_prefix_requests(spec, tokenizer)
    assert requests == build_prefix_requests(spec, tokenizer)  # seeded
    assert [r.kind for r in requests] == ["primer"] + ["uncached", "cached"] * 3
    shared = requests[0].prompt_ids[:64]
    for uncached, cached in zip(requests[1::2], requests[2::2], strict=True):
        assert cached.prompt_ids[:64] == shared and uncached.prompt_ids[:64] != shared
        assert uncached.prompt_ids[64:] == cached.prompt_ids[64:]  # the same question
        assert 5 <= len(cached.prompt_ids) - 64 <= 9
    rows = [{"kind": "primer", "prompt_tokens": 70, "ttft_ms": 90.0, "e2e_ms": 95.0,
             "cached_tokens": 0},
            *({"kind": k, "prompt_tokens": 70, "ttft_ms": ms, "e2e_ms": ms + 5,
               "cached_tokens": hit}
              for k, ms, hit in (("uncached", 30.0, 0), ("cached", 9.0, 64),
                                 ("uncached", 40.0, 0), ("cached", 11.0, 64)))]
    summary = summarize_prefix(rows, spec)
    assert summary["uncached"]["ttft_ms"]["p50"] == pytest.approx(35.0)
    assert summary["cached"]["mean_cached_tokens"] == 64
    assert summary["ttft_ratio"] == pytest.approx(10.0 / 35.0)
    assert "**0.286**" in report.prefix_table(summary)


def test_bench_engine_scenarios_on_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    """Profile, prefix, KV capacity, targets and hf_cb's cache record, without a broker."""
    from transformers import AttentionInterface

    from streamer.engine.attention import ATTENTION_NAME, paged_attention_forward

    out = tmp_path / "engine"
    code = main(["bench", "engine", "--quick", "--model", str(tiny_model), "--requests", "4",
                 "--systems", "engine,hf_cb,profile,prefix", "--prefix-pairs", "2",
                 "--prefix-tokens", "32", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "engine.json").read_text())
    capacity = data["kv_capacity"]
    assert capacity["bytes_per_token"] == 4 * 2 * 2 * 32 * 4  # layers x K,V x heads x dim x fp32
    assert capacity["tokens_per_gib"] == (1 << 30) // (16 * capacity["bytes_per_token"]) * 16
    scenarios = data["scenarios"]
    assert scenarios["kv_cache"]["tokens"] == scenarios["kv_cache"]["num_blocks"] * 16

    profile = scenarios["profile"]
    assert profile["steps"] > 0 and len(profile["per_step"]) == profile["steps"]
    assert set(profile["seconds"]) == {"attention", "attention_proj", "mlp", "norms",
                                       "embed_lm_head", "sampling", "stage_other",
                                       "engine_host", "output_processing", "loop_other"}
    for part in ("attention", "mlp", "norms", "embed_lm_head", "sampling", "engine_host"):
        assert profile["seconds"][part] > 0, part
    assert sum(s["tokens"] for s in profile["per_step"]) == (
        profile["prefill_tokens"] + profile["decode_tokens"])
    # Each request's first token is sampled by its prompt's step; the rest by decode steps.
    assert profile["decode_tokens"] == data["workload_totals"]["requested_tokens"] - 4
    # The timers are gone afterwards: the registered attention is the engine's own again.
    assert AttentionInterface()[ATTENTION_NAME] is paged_attention_forward

    prefix = scenarios["prefix"]
    assert prefix["cached"]["requests"] == prefix["uncached"]["requests"] == 2
    assert prefix["cached"]["mean_cached_tokens"] == 32  # two whole blocks of the prompt
    assert prefix["uncached"]["mean_cached_tokens"] == 0
    assert prefix["ttft_ratio"] > 0
    assert all(r["ttft_ms"] > 0 for r in prefix["requests"])

    targets = {t["key"]: t for t in data["targets"]}
    assert set(targets) == {"engine/ceiling", "kv_tokens_per_gib", "prefix_ttft_ratio",
                            "engine/static", "engine/hf_cb"}
    assert targets["kv_tokens_per_gib"]["measured"] == capacity["tokens_per_gib"]
    assert targets["prefix_ttft_ratio"]["measured"] == prefix["ttft_ratio"]
    assert targets["engine/ceiling"]["measured"] is None  # ceiling not selected

    hf = data["systems"]["hf_cb"]
    given = hf["details"]["cache"]["given"]
    assert given["kv_cache_bytes"] == 1 << 30  # the engine's CPU default budget
    assert given["num_blocks"] * given["bytes_per_page_block"] <= 1 << 30
    if hf["error"] is None:  # transformers' CPU support varies; a failure is recorded instead
        assert hf["details"]["cache"]["resolved"]["num_blocks"] == given["num_blocks"]

    markdown = (out / "engine.md").read_text()
    for heading in ("## Targets", "## KV capacity", "## Shared system prompt",
                    "## Where the engine's time goes"):
        assert heading in markdown
    assert set(data["plots"]) == {"engine-steps.png", "engine-prefix.png"}
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_run_rounds_keeps_each_systems_best_round() -> None:
    from streamer.bench.suite import run_rounds

    calls: list[str] = []
    figures = {"a": iter([100.0, 300.0, 200.0]), "b": iter([50.0, 40.0, 60.0])}

    def runner(name: str):  # type: ignore[no-untyped-def]
        def run() -> SystemResult:
            calls.append(name)
            return SystemResult(name, name, useful_tokens=int(next(figures[name])), wall_s=1.0)
        return run

    best = run_rounds({"a": runner("a"), "b": runner("b")}, ["a", "b"], 3, lambda _: None)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # odd rounds in reverse order
    assert best["a"].tokens_per_s == 300.0 and best["b"].tokens_per_s == 60.0
    assert [r["useful_tokens_per_s"] for r in best["a"].details["rounds"]] == [100, 300, 200]


def test_cli_has_the_three_subcommands() -> None:
    parser = build_parser()
    for argv in (["bench", "engine", "--quick"], ["bench", "compare", "--quick", "--sweep"],
                 ["bench", "serve", "--rate", "2", "--burstiness", "0.5", "--fixed", "8:4"]):
        args = parser.parse_args(argv)
        assert callable(args.func)
    args = parser.parse_args(["bench", "serve", "--fixed", "8:4"])
    assert args.fixed == (8, 4) and math.isinf(args.rate)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "serve", "--fixed", "9:x"])


# -------------------------------------------------------------------------------- smoke runs


@pytest.mark.kafka
def test_bench_serve_against_a_worker(start_worker, kafka_bootstrap: str, prefix: str,  # type: ignore[no-untyped-def]
                                      tiny_model: Path, tmp_path: Path) -> None:
    start_worker()
    out = tmp_path / "serve"
    code = main(["bench", "serve", "--bootstrap-servers", kafka_bootstrap, "--prefix", prefix,
                 "--tokenizer", str(tiny_model), "--requests", "6", "--prompt-range", "4:16",
                 "--output-range", "2:6", "--mix", "high=1,low=1", "--rate", "200",
                 "--max-concurrency", "4", "--seed", "5", "--no-progress", "--timeout", "120",
                 "--out", str(out)])
    assert code == 0
    data = json.loads((out / "serve.json").read_text())
    overall = data["overall"]
    assert overall["completed"] == 6 and data["failures"] == {}
    assert overall["useful_tokens"] == overall["output_tokens"] > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert overall[metric]["p50"] >= 0
    assert set(data["lanes"]) <= {"high", "low"}
    assert sum(lane["completed"] for lane in data["lanes"].values()) == 6
    assert data["slo_ms"] == {"ttft": 500.0, "tpot": 50.0}
    assert "| all | 6/6 |" in (out / "serve.md").read_text()


@pytest.mark.kafka
def test_bench_compare_quick(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    code = main(["bench", "compare", "--quick", "--model", str(tiny_model), "--requests", "4",
                 "--sweep", "--sweep-fractions", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "compare.json").read_text())
    assert set(data["systems"]) == {"ceiling", "engine", "fleet", "static", "hf_cb"}
    for name in ("ceiling", "engine", "fleet", "static"):
        system = data["systems"][name]
        assert system["error"] is None, system
        assert system["useful_tokens_per_s"] > 0
    # HF continuous batching may fail on some CPU builds; then its error is recorded instead.
    hf = data["systems"]["hf_cb"]
    assert (hf["error"] is None) == (hf["useful_tokens_per_s"] is not None)
    requested = data["workload_totals"]["requested_tokens"]
    assert data["systems"]["fleet"]["useful_tokens"] == requested
    assert data["systems"]["engine"]["useful_tokens"] == requested
    assert set(data["ratios"]) >= {"fleet/static", "fleet/hf_cb", "fleet/engine",
                                   "engine/ceiling"}
    assert data["ratios"]["fleet/engine"] > 0
    assert data["machine"]["cpu_count"] and data["machine"]["torch"]
    assert data["seed"] == 0 and len(data["sweep"]) == 1
    profile = data["systems"]["engine"]["details"]["profile"]
    assert profile["steps"] > 0 and set(profile["seconds"]) == {
        "schedule+build", "stage_compute", "output_processing", "loop_other"}
    markdown = (out / "compare.md").read_text()
    assert "fleet/static" in markdown and "Where the engine's time goes" in markdown
    assert set(data["plots"]) == {"compare-throughput.png", "compare-latency-cdf.png",
                                  "compare-lane-ttft.png", "compare-sweep.png",
                                  "compare-steps.png", "compare-prefix.png"}
    assert [t["key"] for t in data["targets"]][:5] == [
        "fleet/static", "fleet/hf_cb", "engine/ceiling", "kv_tokens_per_gib", "prefix_ttft_ratio"]
    assert all(t["measured"] is not None for t in data["targets"] if t["key"] != "fleet/hf_cb")
    assert "## Targets" in markdown
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
