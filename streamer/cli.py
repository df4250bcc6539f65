"""The `streamer` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

from streamer import protocol
from streamer.config import EngineConfig, KafkaSettings, WorkerConfig, env_overrides


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    return KafkaSettings.from_env(bootstrap_servers=getattr(args, "bootstrap_servers", None))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("STREAMER_PREFIX", "llm"),
        help="topic prefix (default llm)",
    )


def cmd_broker(args: argparse.Namespace) -> int:
    from streamer.broker import run_broker

    return run_broker(
        args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_port=args.tls_port
    )


def cmd_topics(args: argparse.Namespace) -> int:
    from streamer.topics import apply_topics, load_specs

    if args.action == "list":
        for spec in load_specs(args.prefix):
            print(
                f"{spec.name:28} partitions={spec.partitions:<3} "
                f"retention_ms={spec.retention_ms:<11}"
                f" {spec.purpose}"
            )
        return 0
    report = asyncio.run(apply_topics(_kafka(args), args.prefix, args.replication_factor))
    for line in report.lines():
        print(line)
    return 0


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Flags, then STREAMER_* environment variables, then defaults."""
    engine_values = env_overrides(EngineConfig)
    flags = {
        "model": args.model,
        "devices": tuple(args.devices.split(",")) if args.devices else None,
        "layer_split": tuple(int(x) for x in args.layer_split.split(","))
        if args.layer_split
        else None,
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_bytes": args.kv_cache_bytes,
        "max_model_len": args.max_model_len,
        "default_max_tokens": args.default_max_tokens,
        "aging_s": args.aging_s,
        "torch_threads": args.torch_threads,
    }
    engine_values.update({k: v for k, v in flags.items() if v is not None})
    worker_values = env_overrides(WorkerConfig)
    worker_values.pop("engine", None)
    worker_values.pop("kafka", None)
    worker_values.pop("limits", None)
    wflags = {
        "group_id": args.group,
        "metrics_port": args.metrics_port,
        "worker_id": args.worker_id,
        "group_instance_id": args.group_instance_id,
        "lane_capacity": args.lane_capacity,
        "prefix": args.prefix,
        "log_prompts": True if args.log_prompts else None,
        "stall_timeout_s": args.stall_timeout_s,
        "shutdown_grace_s": args.shutdown_grace_s,
    }
    worker_values.update({k: v for k, v in wflags.items() if v is not None})
    config = WorkerConfig(engine=EngineConfig(**engine_values), kafka=_kafka(args), **worker_values)
    config.validate()
    return config


def cmd_worker(args: argparse.Namespace) -> int:
    from streamer.observability.logging import configure_logging
    from streamer.worker import Worker

    configure_logging(args.log_level)
    try:
        config = worker_config(args)
    except ValueError as exc:
        print(f"streamer worker: invalid configuration: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        worker = Worker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        await worker.run()

    asyncio.run(main())
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from streamer.fleet import run_fleet
    from streamer.observability.logging import configure_logging

    configure_logging(args.log_level)
    worker_args = ["--model", args.model, "--prefix", args.prefix]
    if args.devices:
        worker_args += ["--devices", args.devices]
    if args.bootstrap_servers:
        worker_args += ["--bootstrap-servers", args.bootstrap_servers]
    return asyncio.run(run_fleet(worker_args, args.workers, args.metrics_port))


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
            handle = await client.submit(args.prompt, priority=args.priority, **fields)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from streamer.demo import run_demo

    return asyncio.run(run_demo(fast=args.fast, workers=args.workers))


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

    p = sub.add_parser("topics", help="topics as code")
    p.add_argument("action", choices=["apply", "list"])
    p.add_argument("--replication-factor", type=int, help="override the specs' replication factor")
    _add_common(p)
    p.set_defaults(func=cmd_topics)

    for name in ("worker", "fleet"):
        p = sub.add_parser(
            name,
            help="serve requests"
            if name == "worker"
            else "run N worker processes in one group, restarting any that die",
        )
        p.add_argument(
            "--model",
            default=os.environ.get("STREAMER_MODEL"),
            help="Hugging Face model folder or id",
        )
        p.add_argument("--devices", help="pipeline stages, e.g. cpu | cpu,cpu | cuda:0,cuda:1")
        p.add_argument("--metrics-port", type=int, help="Prometheus port (0: pick a free one)")
        p.add_argument("--log-level", default=os.environ.get("STREAMER_LOG_LEVEL", "INFO"))
        _add_common(p)
        if name == "worker":
            p.add_argument("--layer-split", help="layers per stage, e.g. 3,5")
            p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
            p.add_argument("--max-num-seqs", type=int)
            p.add_argument("--max-num-batched-tokens", type=int)
            p.add_argument("--kv-cache-bytes", type=int)
            p.add_argument("--max-model-len", type=int)
            p.add_argument("--default-max-tokens", type=int)
            p.add_argument("--torch-threads", type=int,
                           help="torch intra-op threads on CPU (1 when workers share few cores)")
            p.add_argument(
                "--aging-s", type=float, help="waiting seconds that lift a request one lane"
            )
            p.add_argument("--group", help="consumer group (default streamer-workers)")
            p.add_argument("--worker-id", default=None)
            p.add_argument("--group-instance-id", help="static membership id")
            p.add_argument("--lane-capacity", type=int)
            p.add_argument(
                "--stall-timeout-s",
                type=float,
                help="no step this long with work queued: unhealthy (default 60)",
            )
            p.add_argument(
                "--shutdown-grace-s",
                type=float,
                help="SIGTERM: time for in-flight work to finish (default 30)",
            )
            p.add_argument(
                "--log-prompts",
                action="store_true",
                help="log prompt text at debug level (never logged otherwise)",
            )
            p.set_defaults(func=cmd_worker)
        else:
            p.add_argument("--workers", type=int, default=2)
            p.set_defaults(func=cmd_fleet, metrics_port=9400)

    p = sub.add_parser("model", help="offline model folders")
    msub = p.add_subparsers(dest="action", required=True)
    m = msub.add_parser("init-tiny", help="write a small Llama-family model folder")
    m.add_argument("dir")
    m.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    m.add_argument("--arch", choices=["llama", "mistral", "qwen2"])
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_model)

    p = sub.add_parser("submit", help="send one request and stream its tokens")
    p.add_argument("prompt")
    p.add_argument("--priority", default="normal", choices=list(protocol.PRIORITIES))
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append")
    p.add_argument("--timeout", type=float, default=300.0)
    _add_common(p)
    p.set_defaults(func=cmd_submit)

    from streamer.bench.cli import add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="broker, topics, tiny model, two workers, a dozen prompts")
    p.add_argument("--fast", action="store_true", help="fewer tokens (used by the tests)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
