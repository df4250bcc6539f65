"""`streamer bench gateway`: the OpenAI gateway against the Kafka client, and many open streams.

Starts a throwaway fleet (embedded broker, fresh topics, one worker) and a `streamer gateway`
process, then measures, with the same prompts on both paths:

1. Latency: requests one at a time, alternating the direct `StreamerClient` and the gateway
   (SSE over HTTP, the way an OpenAI SDK streams), so both see the same machine load. TTFT is
   from sending to the first text; the overhead is gateway p50 minus direct p50.
2. Throughput: `concurrency` requests at once on each path, completion tokens per second.
3. Streams: `streams` streaming connections opened together. The worker's engine is held
   (its gate file, docs/testing.md) until the gateway's own gauge shows all of them open, so
   they are held at once whatever the machine's speed; then it runs and every stream
   completes. The gateway's resident memory (VmRSS) before, with all open, at the sampled peak
   while they stream, and after; VmHWM is the kernel's peak.
Results go to `<out>/gateway.json` and `gateway.md`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from streamer.bench.local_fleet import LocalFleet, local_fleet, worker_args
from streamer.bench.stats import summarize
from streamer.client import StreamerClient, UpdateKind


@dataclass(frozen=True)
class GatewayBenchOptions:
    model: str
    requests: int = 40
    max_tokens: int = 16
    concurrency: int = 32
    streams: int = 500
    stream_tokens: int = 64  # long enough that the first streams are open when the last open
    out: Path = Path("bench-results")


def _prompt(i: int) -> str:
    return f"Request {i}: tell me about Kafka and streaming systems"


async def _direct(client: StreamerClient, i: int, max_tokens: int) -> tuple[float, float, int]:
    began = time.perf_counter()
    handle = await client.submit(_prompt(i), max_tokens=max_tokens)
    first = None
    tokens = 0
    async for update in handle.updates():
        if update.kind is UpdateKind.TEXT:
            first = first or time.perf_counter()
            tokens += update.tokens
    await handle.result()
    end = time.perf_counter()
    return (first or end) - began, end - began, tokens


async def _via_gateway(http: httpx.AsyncClient, url: str, model: str, i: int,
                       max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "prompt": _prompt(i), "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (first or end) - began, end - began, tokens


def _rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _set_gate(gate: Path, *, hold: bool) -> None:
    """The worker's test gate: present and empty holds its engine, absent lets it run."""
    if hold:
        gate.write_text("")
    else:
        gate.unlink(missing_ok=True)


def _ms(values: list[float]) -> dict[str, float]:
    s = summarize(values)
    return {} if s is None else {k: round(v, 2) for k, v in s.to_json(1000).items()}


async def _start_gateway(fleet: LocalFleet, log_dir: Path) -> tuple[Any, str]:
    log_path = log_dir / "gateway.log"
    out = open(log_path, "wb")  # noqa: SIM115, ASYNC230  (owned by the child)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer.cli", "gateway", "--prefix", fleet.prefix, "--port", "0",
        "--host", "127.0.0.1", "--bootstrap-servers", fleet.kafka.bootstrap_servers,
        "--batch-db", str(log_dir / "gateway.db"), "--max-backlog", "none",
        stdout=out, stderr=asyncio.subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 120
    while True:
        match = re.search(r'"port": (\d+), "event": "gateway_listening"',
                          log_path.read_text(errors="replace"))
        if match:
            break
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start:\n" + log_path.read_text()[-2000:])
        await asyncio.sleep(0.1)
    url = f"http://127.0.0.1:{match.group(1)}"
    async with httpx.AsyncClient() as http:
        while (await http.get(url + "/readyz")).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway never ready")
            await asyncio.sleep(0.1)
    return proc, url


async def _open_streams(url: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    found = re.search(r"^streamer_gateway_open_streams (\S+)", text, re.M)
    return float(found.group(1)) if found else 0.0


async def run(options: GatewayBenchOptions) -> dict[str, Any]:
    log_dir = options.out / "gateway-logs"
    model = Path(options.model).name
    result: dict[str, Any] = {"options": {k: str(v) for k, v in asdict(options).items()},
                              "load_before": os.getloadavg()}
    gate = (log_dir / "gate").resolve()
    async with local_fleet(worker_args(options.model, max_num_seqs=64,
                                       max_num_batched_tokens=512, kv_cache_bytes=None,
                                       max_model_len=None), log_dir=log_dir,
                           env={"STREAMER_TEST_GATE": str(gate)}) as fleet:
        gateway, url = await _start_gateway(fleet, log_dir)
        limits = httpx.Limits(max_connections=options.streams + 16,
                              max_keepalive_connections=options.streams + 16)
        try:
            async with StreamerClient(fleet.kafka, fleet.prefix) as client, \
                    httpx.AsyncClient(timeout=600, limits=limits) as http:
                for i in range(4):  # warm both paths (connections, partitions assigned)
                    await _direct(client, i, 2)
                    await _via_gateway(http, url, model, i, 2)
                # The gateway's own background (its consumers' fetch loops, the backlog
                # reader), with its partitions assigned and no request open.
                idle_began, idle_cpu = time.perf_counter(), _cpu_s(gateway.pid)
                await asyncio.sleep(5)
                idle = (_cpu_s(gateway.pid) - idle_cpu) / (time.perf_counter() - idle_began)
                result["gateway_idle_cpu_ms_per_s"] = round(idle * 1000, 1)
                direct, through = [], []
                cpu = 0.0
                for i in range(options.requests):
                    direct.append(await _direct(client, 100 + i, options.max_tokens))
                    before = _cpu_s(gateway.pid)
                    through.append(await _via_gateway(http, url, model, 100 + i,
                                                      options.max_tokens))
                    cpu += _cpu_s(gateway.pid) - before - idle * through[-1][1]
                result["latency"] = {
                    "direct_ttft_ms": _ms([d[0] for d in direct]),
                    "gateway_ttft_ms": _ms([g[0] for g in through]),
                    "direct_e2e_ms": _ms([d[1] for d in direct]),
                    "gateway_e2e_ms": _ms([g[1] for g in through]),
                }
                lat = result["latency"]
                lat["ttft_overhead_p50_ms"] = round(
                    lat["gateway_ttft_ms"]["p50"] - lat["direct_ttft_ms"]["p50"], 2)
                lat["e2e_overhead_p50_ms"] = round(
                    lat["gateway_e2e_ms"]["p50"] - lat["direct_e2e_ms"]["p50"], 2)
                # Each gateway request ran right after its direct twin, under nearly the same
                # load: the median of the pairs' differences is the steadier estimate.
                pairs = sorted(g[0] - d[0] for d, g in zip(direct, through, strict=True))
                lat["ttft_overhead_paired_median_ms"] = round(
                    pairs[len(pairs) // 2] * 1000, 2)
                lat["gateway_cpu_ms_per_request"] = round(cpu * 1000 / options.requests, 2)
                result["throughput"] = {}
                for name, one in (("direct", lambda i: _direct(client, i, options.max_tokens * 4)),
                                  ("gateway", lambda i: _via_gateway(
                                      http, url, model, i, options.max_tokens * 4))):
                    began, cpu_before = time.perf_counter(), _cpu_s(gateway.pid)
                    done = await asyncio.gather(*(one(1000 + i)
                                                  for i in range(options.concurrency)))
                    wall = time.perf_counter() - began
                    tokens = sum(d[2] for d in done)
                    result["throughput"][name] = {
                        "requests": len(done), "tokens": tokens, "wall_s": round(wall, 3),
                        "tokens_per_s": round(tokens / wall, 1),
                        "gateway_cpu_s": round(_cpu_s(gateway.pid) - cpu_before, 3)}
                result["streams"] = await _hold(options, http, url, model, gateway.pid, gate)
        finally:
            gateway.terminate()
            await asyncio.wait_for(gateway.wait(), 30)
    result["load_after"] = os.getloadavg()
    return result


async def _hold(options: GatewayBenchOptions, http: httpx.AsyncClient, url: str, model: str,
                pid: int, gate: Path) -> dict[str, Any]:
    before = _rss(pid)
    _set_gate(gate, hold=True)  # no stream can finish before all are open
    peak = {"rss_kib": before["VmRSS"]}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak["rss_kib"] = max(peak["rss_kib"], _rss(pid)["VmRSS"])
            await asyncio.sleep(0.2)

    began, cpu_before = time.perf_counter(), _cpu_s(pid)
    streams = asyncio.gather(*(_via_gateway(http, url, model, 5000 + i, options.stream_tokens)
                               for i in range(options.streams)), return_exceptions=True)
    try:
        deadline = time.monotonic() + 300
        # A remote gauge: polled, there is no event to wait on.
        while await _open_streams(url) < options.streams and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        all_open = await _open_streams(url)
        opened_s = time.perf_counter() - began
        held = _rss(pid)
    finally:
        _set_gate(gate, hold=False)
    sampler = asyncio.create_task(sample())
    outcomes = await streams
    wall = time.perf_counter() - began
    cpu = _cpu_s(pid) - cpu_before
    stop.set()
    await sampler
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    after = _rss(pid)
    return {"streams": options.streams, "completed": len(ok),
            "failed": len(outcomes) - len(ok), "open_at_once": all_open,
            "open_after_s": round(opened_s, 2), "rss_mib_all_open": round(held["VmRSS"] / 1024, 1),
            "wall_s": round(wall, 2), "tokens": sum(o[2] for o in ok),
            "gateway_cpu_s": round(cpu, 2),
            "gateway_cpu_ms_per_1k_tokens": round(cpu * 1e6 / max(1, sum(o[2] for o in ok)), 1),
            "ttft_ms": _ms([o[0] for o in ok]),
            "rss_mib_before": round(before["VmRSS"] / 1024, 1),
            "rss_mib_peak_sampled": round(peak["rss_kib"] / 1024, 1),
            "rss_mib_after": round(after["VmRSS"] / 1024, 1),
            "hwm_mib": round(after["VmHWM"] / 1024, 1),
            "kib_per_stream": round((held["VmRSS"] - before["VmRSS"]) / options.streams, 1)}


def markdown(result: dict[str, Any]) -> str:
    lat, thr, st = result["latency"], result["throughput"], result["streams"]
    lines = ["# streamer bench gateway", "",
             f"Load average before {result['load_before']}, after {result['load_after']}.", "",
             "| path | TTFT p50 | TTFT p90 | e2e p50 | e2e p90 |", "|---|---|---|---|---|"]
    for path in ("direct", "gateway"):
        t, e = lat[f"{path}_ttft_ms"], lat[f"{path}_e2e_ms"]
        lines.append(f"| {path} | {t['p50']} ms | {t['p90']} ms | {e['p50']} ms | "
                     f"{e['p90']} ms |")
    lines += ["", f"Overhead p50: TTFT {lat['ttft_overhead_p50_ms']} ms (median of paired "
              f"differences {lat['ttft_overhead_paired_median_ms']} ms), e2e "
              f"{lat['e2e_overhead_p50_ms']} ms; gateway CPU "
              f"{lat['gateway_cpu_ms_per_request']} ms per request beyond its idle "
              f"{result['gateway_idle_cpu_ms_per_s']} ms per second.", "",
              "| path | requests at once | tokens | wall | tokens/s | gateway CPU |",
              "|---|---|---|---|---|---|"]
    for path, t in thr.items():
        lines.append(f"| {path} | {t['requests']} | {t['tokens']} | {t['wall_s']} s | "
                     f"{t['tokens_per_s']} | {t['gateway_cpu_s']} s |")
    lines += ["", f"{st['streams']} streams: {st['open_at_once']:.0f} open at once after "
              f"{st['open_after_s']} s (engine held), then {st['completed']} completed, "
              f"{st['failed']} failed, in {st['wall_s']} s; gateway RSS "
              f"{st['rss_mib_before']} MiB before, {st['rss_mib_all_open']} MiB with all open, "
              f"{st['rss_mib_peak_sampled']} MiB at the sampled peak (VmHWM {st['hwm_mib']} MiB), "
              f"{st['rss_mib_after']} MiB after ({st['kib_per_stream']} KiB per stream); "
              f"gateway CPU {st['gateway_cpu_s']} s ({st['gateway_cpu_ms_per_1k_tokens']} ms per "
              f"1,000 tokens); TTFT p50 {st['ttft_ms'].get('p50')} ms, p90 "
              f"{st['ttft_ms'].get('p90')} ms."]
    return "\n".join(lines)


def run_gateway_bench(options: GatewayBenchOptions) -> int:
    from streamer.bench import report
    from streamer.bench.results import machine_info

    result = asyncio.run(run(options))
    result["machine"] = machine_info()
    text = markdown(result)
    for path in report.write_results(options.out, "gateway", result, text):
        print(f"wrote {path}")
    print(text)
    streams = result["streams"]
    return 0 if streams["failed"] == 0 else 1
