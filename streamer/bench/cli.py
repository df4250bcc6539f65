"""`streamer bench engine | serve | compare | affinity | failover | startup | cache`: flags and
dispatch (work: sibling modules).

Results go to files under `--out` (default bench-results/): JSON with everything (machine,
versions, config, seed, per-system figures), a Markdown summary, and PNG plots for `compare`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
from pathlib import Path
from typing import Any

from streamer.bench.stats import parse_mix, parse_slo
from streamer.config import EngineConfig

DEFAULT_OUT = Path("bench-results")
DEFAULT_SLO = "ttft=500ms,tpot=50ms"

# --quick: a smoke run on the tiny preset that finishes in well under a minute.
QUICK = {"preset": "tiny", "requests": 8, "prompt_range": (8, 32), "output_range": (4, 16),
         "ceiling_batches": (4, 8), "sweep_fractions": (0.5, 1.0), "prefix_pairs": 2}
FULL = {"preset": "bench", "requests": 96, "prompt_range": (16, 128), "output_range": (16, 160),
        "ceiling_batches": (16, 32, 64), "sweep_fractions": (0.25, 0.5, 0.75, 1.0, 1.5),
        "prefix_pairs": 8}
# The engine's own defaults (EngineConfig): a bench with no flags runs what a user gets.
_ENGINE = EngineConfig()


def add_bench_parser(sub: Any) -> None:
    """Register `streamer bench` and its subcommands on the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks (results written to files)",
                           description=__doc__)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    bsub = bench.add_subparsers(dest="bench_command")

    engine = bsub.add_parser("engine", help="engine vs raw-forward ceiling, static batching and "
                             "HF continuous batching, in one process")
    add_engine_arguments(engine)

    serve = bsub.add_parser("serve", help="load generator against a running fleet through Kafka")
    _add_workload(serve, mix_default="normal=1")
    serve.add_argument("--bootstrap-servers", help="Kafka bootstrap servers "
                       "(default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    serve.add_argument("--prefix", default=os.environ.get("STREAMER_PREFIX", "llm"),
                       help="topic prefix (default llm)")
    serve.add_argument("--tokenizer", help="model folder or hub id whose tokenizer sizes the "
                       "prompts exactly (without it a prompt of N tokens is N words)")
    serve.add_argument("--rate", type=float, default=float("inf"),
                       help="requests per second (default inf: all at once, offline)")
    serve.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the gaps: 1 = Poisson, <1 burstier")
    serve.add_argument("--max-concurrency", type=int, help="most requests in flight")
    serve.add_argument("--slo", default=DEFAULT_SLO, help=f"goodput SLO (default {DEFAULT_SLO})")
    serve.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve.add_argument("--out", type=Path, default=DEFAULT_OUT)
    serve.set_defaults(func=cmd_serve)

    affinity = bsub.add_parser(
        "affinity", help="prefix-cache hit ratio of multi-turn conversations on a local fleet, "
        "keyed by session vs keyed by id",
        description="Runs the same multi-turn conversations on a fresh local fleet (embedded "
        "broker, N workers) once per mode: requests keyed by their conversation (session) and "
        "keyed by their id; reports the fleet's prefix-cache hit ratio from the workers' "
        "counters, and the ceiling one never-evicting cache would reach.")
    affinity.add_argument("--conversations", type=int, default=16)
    affinity.add_argument("--turns", type=int, default=4)
    affinity.add_argument("--system-words", type=int, default=48,
                          help="each conversation's own system prompt (default 48)")
    affinity.add_argument("--user-words", type=int, default=24, help="per user turn (default 24)")
    affinity.add_argument("--max-tokens", type=int, default=24, help="per answer (default 24)")
    affinity.add_argument("--workers", type=int, default=2)
    affinity.add_argument("--model", help="model folder (default: the preset's offline model)")
    affinity.add_argument("--preset", choices=["tiny", "bench"], default="tiny")
    affinity.add_argument("--threads", type=int, help="torch threads per worker")
    affinity.add_argument("--worker-flags", default="--assignor range",
                          help="extra `streamer worker` flags (default '--assignor range': "
                          "each lane's partitions split evenly between the workers)")
    affinity.add_argument("--modes", type=_names_of(("session", "id")), default=("session", "id"))
    affinity.add_argument("--seed", type=int, default=0)
    affinity.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    affinity.add_argument("--out", type=Path, default=DEFAULT_OUT)
    affinity.set_defaults(func=cmd_affinity)
    gateway = bsub.add_parser("gateway", help="the OpenAI gateway vs the Kafka client (TTFT, "
                              "throughput) and many concurrent streams with memory")
    gateway.add_argument("--model", help="model folder (default: the tiny preset's offline "
                         "model)")
    gateway.add_argument("--requests", type=int, default=40,
                         help="sequential requests per path for latency (default 40)")
    gateway.add_argument("--max-tokens", type=int, default=16)
    gateway.add_argument("--concurrency", type=int, default=32,
                         help="requests at once per path for throughput (default 32)")
    gateway.add_argument("--streams", type=int, default=500,
                         help="streaming connections held at once (default 500)")
    gateway.add_argument("--stream-tokens", type=int, default=64,
                         help="tokens per held stream (default 64)")
    gateway.add_argument("--out", type=Path, default=DEFAULT_OUT)
    gateway.set_defaults(func=cmd_gateway)

    compare = bsub.add_parser("compare", help="ceiling, engine, fleet via Kafka, static and HF "
                              "continuous batching on one workload, with plots")
    _add_engine_options(compare, mix_default="urgent=0.05,high=0.15,normal=0.5,low=0.3")
    compare.add_argument("--slo", default=DEFAULT_SLO, help=f"goodput SLO (default {DEFAULT_SLO})")
    compare.add_argument("--workers", type=int, default=1, help="workers in the fleet")
    compare.add_argument("--worker-flags", default="",
                         help="extra `streamer worker` flags for the fleet, e.g. '--chunk-ms 0'")
    compare.add_argument("--sweep", action="store_true",
                         help="also sweep the fleet's arrival rate (latency-throughput curve)")
    compare.add_argument("--sweep-fractions", type=_floats,
                         help="rates as fractions of the offline throughput "
                         "(default 0.25,0.5,0.75,1,1.5)")
    compare.set_defaults(func=cmd_compare)

    failover = bsub.add_parser("failover", help="tokens generated twice when a worker joins or "
                               "dies under load, with resumable attempts on and off")
    failover.add_argument("--model", default=None,
                          help="model folder (default: the tiny preset under .streamer/models)")
    failover.add_argument("--requests", type=int, default=40)
    failover.add_argument("--max-tokens", type=int, default=160)
    failover.add_argument("--change-after", type=int, default=40,
                          help="change the fleet once every request has this many tokens")
    failover.add_argument("--scenarios", type=_scenarios, default=("scale-up", "crash"),
                          help="scale-up, crash or both (default both)")
    failover.add_argument("--worker-flags", default="--torch-threads 1",
                          help="extra `streamer worker` flags")
    failover.add_argument("--out", type=Path, default=Path("bench-results/failover"))
    failover.set_defaults(func=cmd_failover)

    startup = bsub.add_parser("startup", help="first-request TTFT after a worker starts: "
                              "without warm-up, with it, with --compile")
    startup.add_argument("--model", required=True, help="model folder")
    startup.add_argument("--requests", type=int, default=10)
    startup.add_argument("--max-tokens", type=int, default=16)
    startup.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    startup.add_argument("--repeat", type=int, default=3, help="starts per variant (interleaved)")
    startup.add_argument("--in-process", action="store_true",
                         help="an Engine in this process instead of a worker behind Kafka")
    startup.add_argument("--variants", type=_names_of(("no-warmup", "warmup", "warmup+compile")),
                         default=("no-warmup", "warmup", "warmup+compile"))
    startup.add_argument("--out", type=Path, default=Path("bench-results/startup"))
    startup.set_defaults(func=lambda args: _startup().cmd_startup(args))

    cache = bsub.add_parser("cache", help="result-cache hit latency per level (L1, L2 Redis, "
                            "L3 disk) against computing the answer")
    cache.add_argument("--model", required=True, help="model folder")
    cache.add_argument("--prompts", type=int, default=10)
    cache.add_argument("--max-tokens", type=int, default=32)
    cache.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    cache.add_argument("--out", type=Path, default=Path("bench-results/cache"))
    cache.set_defaults(func=lambda args: _startup().cmd_cache(args))


def _startup() -> Any:
    from streamer.bench import startup

    return startup


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `bench engine` (shared with `python -m streamer.bench.engine`)."""
    _add_engine_options(parser, mix_default="normal=1")
    parser.set_defaults(func=cmd_engine)


def _add_engine_options(parser: argparse.ArgumentParser, mix_default: str) -> None:
    _add_workload(parser, mix_default=mix_default)
    parser.add_argument("--model", help="model folder (default: the preset's offline model "
                        "under .streamer/models/<preset>)")
    parser.add_argument("--preset", choices=["tiny", "bench"],
                        help="offline model preset when --model is not given (default bench)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny preset, 8 short requests, small ceiling batches")
    parser.add_argument("--max-num-seqs", type=int, default=_ENGINE.max_num_seqs,
                        help=f"engine default: {_ENGINE.max_num_seqs}")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=_ENGINE.max_num_batched_tokens,
                        help=f"engine default: {_ENGINE.max_num_batched_tokens}")
    parser.add_argument("--kv-cache-bytes", type=int, help="default: the engine's (1 GiB on "
                        "CPU); transformers' continuous batching gets the same bytes")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's own context length")
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--static-window-ms", type=float, default=10.0)
    parser.add_argument("--ceiling-batches", type=_ints, help="batch sizes to try (default "
                        "16,32,64)")
    parser.add_argument("--threads", type=int, help="torch threads here and in the worker "
                        "(default: torch's own choice)")
    parser.add_argument("--systems", type=_names, help="only these systems and scenarios, "
                        "e.g. ceiling,engine,prefix (systems: ceiling, engine, fleet, static, "
                        "hf_cb; scenarios: profile, prefix; default: all)")
    parser.add_argument("--prefix-pairs", type=int, help="shared-system-prompt scenario: "
                        "uncached/cached request pairs (default 8)")
    parser.add_argument("--prefix-tokens", type=int, default=256,
                        help="length of the shared system prompt (default 256)")
    parser.add_argument("--prefix-suffix", type=_range, default=(16, 32),
                        help="tokens of each request's own question LO:HI (default 16:32)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every system, order "
                        "reversed on odd rounds; the best round of each counts (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def _add_workload(parser: argparse.ArgumentParser, mix_default: str) -> None:
    parser.add_argument("--requests", type=int, help="number of requests (default 96)")
    parser.add_argument("--prompt-range", type=_range, help="prompt tokens LO:HI (default 16:128)")
    parser.add_argument("--output-range", type=_range, help="output tokens LO:HI (default 16:160)")
    parser.add_argument("--fixed", type=_pair, help="fixed PROMPT:OUTPUT lengths for every "
                        "request instead of the ranges")
    parser.add_argument("--mix", default=mix_default, help="lane weights, e.g. "
                        "urgent=0.05,high=0.15,normal=0.5,low=0.3")
    parser.add_argument("--seed", type=int, default=0)


# ------------------------------------------------------------------------------ parsing


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI, e.g. 16:128") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI")
    return pair


def _pair(text: str) -> tuple[int, int]:
    prompt, _, output = text.partition(":")
    try:
        pair = (int(prompt), int(output))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PROMPT:OUTPUT, e.g. 64:128") from None
    if min(pair) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both lengths must be >= 1")
    return pair


def _names(text: str) -> tuple[str, ...]:
    from streamer.bench.results import LABELS
    from streamer.bench.scenarios import SCENARIOS

    known = (*LABELS, *SCENARIOS)
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: systems and scenarios are "
                                         f"{', '.join(known)}")
    return names


def _names_of(known: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        if not names or set(names) - set(known):
            raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(known)}")
        return names

    return parse


def _scenarios(text: str) -> tuple[str, ...]:
    from streamer.bench.failover import SCENARIOS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in SCENARIOS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: scenarios are {', '.join(SCENARIOS)}")
    return names


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _workload_spec(args: argparse.Namespace, defaults: dict[str, Any], *,
                   rate: float = float("inf"), burstiness: float = 1.0) -> Any:
    from streamer.bench.workload import WorkloadSpec

    return WorkloadSpec(
        num_requests=args.requests or defaults["requests"],
        prompt_range=args.prompt_range or defaults["prompt_range"],
        output_range=args.output_range or defaults["output_range"],
        fixed=args.fixed, mix=tuple(parse_mix(args.mix).items()), rate=rate,
        burstiness=burstiness, seed=args.seed)


def _options(args: argparse.Namespace) -> Any:
    from streamer.bench.prefix import PrefixSpec
    from streamer.bench.suite import BenchOptions, apply_threads, resolve_model

    defaults = QUICK if args.quick else FULL
    preset = args.preset or defaults["preset"]
    apply_threads(args.threads)
    return BenchOptions(
        model=resolve_model(args.model, preset), preset=preset if not args.model else "",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len,
        static_batch=args.static_batch, static_window_s=args.static_window_ms / 1000,
        ceiling_batches=args.ceiling_batches or defaults["ceiling_batches"],
        threads=args.threads, repeat=args.repeat, systems=args.systems,
        workers=getattr(args, "workers", 1),
        worker_flags=tuple(shlex.split(getattr(args, "worker_flags", "") or "")),
        workload=_workload_spec(args, defaults),
        prefix=PrefixSpec(pairs=args.prefix_pairs or defaults["prefix_pairs"],
                          prefix_tokens=args.prefix_tokens, suffix_range=args.prefix_suffix,
                          seed=args.seed))


# ----------------------------------------------------------------------------- commands


def cmd_engine(args: argparse.Namespace) -> int:
    from streamer.bench.engine import run_engine_bench

    return run_engine_bench(_options(args), args.out)


def cmd_compare(args: argparse.Namespace) -> int:
    from streamer.bench.compare import run_compare

    defaults = QUICK if args.quick else FULL
    fractions = ((args.sweep_fractions or defaults["sweep_fractions"]) if args.sweep else ())
    return run_compare(_options(args), args.out, slo=parse_slo(args.slo),
                       sweep_fractions=fractions)


def cmd_failover(args: argparse.Namespace) -> int:
    from streamer.bench.failover import run_failover_bench
    from streamer.bench.suite import resolve_model

    model = resolve_model(args.model, "tiny")
    return run_failover_bench(model, args.out, requests=args.requests,
                              max_tokens=args.max_tokens, change_after=args.change_after,
                              scenarios=args.scenarios,
                              worker_flags=shlex.split(args.worker_flags))


def cmd_affinity(args: argparse.Namespace) -> int:
    from streamer.bench.affinity import AffinitySpec, run_affinity_bench
    from streamer.bench.suite import apply_threads, resolve_model

    apply_threads(args.threads)
    spec = AffinitySpec(conversations=args.conversations, turns=args.turns,
                        system_words=args.system_words, user_words=args.user_words,
                        max_tokens=args.max_tokens, seed=args.seed)
    return run_affinity_bench(spec, model=resolve_model(args.model, args.preset),
                              workers=args.workers, worker_flags=shlex.split(args.worker_flags),
                              threads=args.threads, modes=args.modes, out=args.out,
                              timeout_s=args.timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    from streamer.bench import report
    from streamer.bench.results import machine_info
    from streamer.bench.serve import progress_bar, run_load
    from streamer.bench.workload import build_workload
    from streamer.config import KafkaSettings

    slo = parse_slo(args.slo)
    spec = _workload_spec(args, FULL, rate=args.rate, burstiness=args.burstiness)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    workload = build_workload(spec, tokenizer)
    kafka = KafkaSettings.from_env(bootstrap_servers=args.bootstrap_servers)
    with progress_bar(len(workload.requests), not args.no_progress) as on_done:
        served = asyncio.run(run_load(kafka, args.prefix, workload, slo=slo,
                                      max_concurrency=args.max_concurrency,
                                      timeout_s=args.timeout, on_done=on_done))
    data = {"benchmark": "serve", "machine": machine_info(), "prefix": args.prefix,
            "bootstrap_servers": kafka.bootstrap_servers, "workload": spec.to_json(),
            "seed": args.seed, "max_concurrency": args.max_concurrency,
            "exact_prompt_lengths": tokenizer is not None, **served.to_json()}
    groups = {"all": served.overall.to_json(),
              **{lane: agg.to_json() for lane, agg in served.lanes.items()}}
    markdown = "\n".join([
        "# streamer bench serve", "",
        f"{len(workload.requests)} requests to prefix `{args.prefix}` at "
        f"{'all at once' if args.rate == float('inf') else f'{args.rate:g} req/s'} "
        f"(burstiness {args.burstiness:g}), seed {args.seed}; SLO {args.slo}.", "",
        report.throughput_table(groups), "", report.latency_table(groups),
        "" if not served.failures else f"\nFailures: {served.failures}"])
    for path in report.write_results(args.out, "serve", data, markdown):
        print(f"wrote {path}")
    print(report.throughput_table(groups))
    return 0 if not served.failures else 1


def cmd_gateway(args: argparse.Namespace) -> int:
    from streamer.bench.gateway import GatewayBenchOptions, run_gateway_bench
    from streamer.bench.suite import resolve_model

    return run_gateway_bench(GatewayBenchOptions(
        model=resolve_model(args.model, "tiny"), requests=args.requests,
        max_tokens=args.max_tokens, concurrency=args.concurrency, streams=args.streams,
        stream_tokens=args.stream_tokens, out=args.out))
