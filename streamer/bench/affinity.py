"""Prefix-affine routing: the fleet's prefix-cache hit ratio for multi-turn conversations keyed by
session vs keyed by request id (issue #15).

N conversations run at once, each turn after the previous one's answer: turn t is chat
`messages` (its own system prompt, then every earlier user turn and answer, then a new user
message), so each turn's rendered prompt starts with the previous turn's prompt and answer. Keyed
by session, every turn of a conversation goes to one partition, so to the worker that cached the
conversation so far; keyed by id, each turn lands on a random partition and, with W workers, on
the worker holding its history about 1/W of the time.

Each mode runs on a fresh fleet (embedded broker, fresh topics, W workers: cold caches) with the
same conversations (seeded words, greedy answers, so identical token sequences). The figure is
the fleet's hit ratio from the workers' own counters, summed over workers:
  hits / queries = Δ streamer_prefix_cache_hits_total / Δ streamer_prefix_cache_queries_total
next to the ceiling: the tokens a single cache that never evicts could serve, computed from the
transcripts with the model's tokenizer (whole blocks of the common prefix with the previous
turn's prompt and answer, never a prompt's last token).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from streamer.bench.local_fleet import local_fleet
from streamer.bench.probe import metrics_port
from streamer.bench.workload import _WORDS
from streamer.client import StreamerClient
from streamer.config import KafkaSettings
from streamer.fleet import Fleet
from streamer.protocol import EventType

MODES = ("session", "id")
_COUNTERS = {"streamer_prefix_cache_queries": "queries", "streamer_prefix_cache_hits": "hits"}


@dataclass(frozen=True)
class AffinitySpec:
    """What to run; equal specs give equal conversations."""

    conversations: int = 16
    turns: int = 4
    system_words: int = 48
    """Words of each conversation's own system prompt (about one token each)."""
    user_words: int = 24
    """Words of each user message."""
    max_tokens: int = 24
    """Tokens of each answer (ignore_eos, greedy)."""
    seed: int = 0

    def validate(self) -> None:
        if min(self.conversations, self.turns, self.system_words, self.user_words,
               self.max_tokens) < 1:
            raise ValueError(f"AffinitySpec {self}: every count must be >= 1")


@dataclass
class Turn:
    conversation: int
    turn: int
    messages: list[dict[str, str]]
    worker: str = ""
    outcome: str = ""
    prompt_tokens: int = 0
    token_ids: tuple[int, ...] = ()
    ttft_ms: float | None = None


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


async def run_conversations(kafka: KafkaSettings, prefix: str, spec: AffinitySpec, mode: str,
                            timeout_s: float) -> list[Turn]:
    """Every conversation at once, each turn after the previous answer; keyed as `mode` says."""
    tag = uuid.uuid4().hex[:6]
    turns: list[Turn] = []

    async def conversation(index: int, client: StreamerClient) -> None:
        rng = random.Random(spec.seed * 100_003 + index)  # the same words in every mode
        messages = [{"role": "system", "content": _words(rng, spec.system_words)}]
        for t in range(spec.turns):
            messages = [*messages, {"role": "user", "content": _words(rng, spec.user_words)}]
            turn = Turn(index, t, messages)
            turns.append(turn)
            handle = await client.submit(
                messages=messages, request_id=f"{tag}-c{index}-t{t}",
                session=f"{tag}-conversation-{index}" if mode == "session" else None,
                max_tokens=spec.max_tokens, ignore_eos=True, temperature=0.0)
            result = await handle.result(timeout_s)
            outcome = result.outcome
            turn.worker, turn.outcome = outcome.worker, str(outcome.type)
            if outcome.type is not EventType.COMPLETED:
                return
            turn.prompt_tokens = outcome.usage.prompt_tokens if outcome.usage else 0
            turn.token_ids = tuple(result.token_ids)
            turn.ttft_ms = outcome.timings.ttft_ms if outcome.timings else None
            messages = [*messages, {"role": "assistant", "content": result.text}]

    async with StreamerClient(kafka, prefix) as client:
        await asyncio.gather(*(conversation(i, client) for i in range(spec.conversations)))
    return sorted(turns, key=lambda t: (t.conversation, t.turn))


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode("utf-8", "replace"))


async def prefix_counters(ports: list[int]) -> list[dict[str, float]]:
    """Each worker's prefix-cache queries and hits (tokens), from its /metrics."""
    out = []
    for text in await asyncio.gather(*(asyncio.to_thread(_fetch, p) for p in ports)):
        values = {"queries": 0.0, "hits": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name in _COUNTERS:
                values[_COUNTERS[family.name]] = sum(s.value for s in family.samples
                                                     if s.name.endswith("_total"))
        out.append(values)
    return out


def ceiling_hits(turns: list[Turn], tokenizer: Any, block_size: int) -> tuple[int, int]:
    """(cacheable tokens, prompt tokens) over all turns for one cache that never evicts."""
    hits = total = 0
    previous: dict[int, list[int]] = {}  # conversation -> ids whose KV its last turn computed
    for turn in turns:
        if turn.outcome != str(EventType.COMPLETED):
            continue
        ids = list(tokenizer.apply_chat_template(turn.messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
        before = previous.get(turn.conversation, [])
        common = 0
        while common < min(len(ids) - 1, len(before)) and ids[common] == before[common]:
            common += 1
        hits += common // block_size * block_size
        total += len(ids)
        # The answer's last token is sampled but never fed back: its KV is not computed.
        previous[turn.conversation] = ids + list(turn.token_ids[:-1])
    return hits, total


async def wait_settled(fleet: Fleet, partitions: int, within_s: float = 180.0) -> None:
    """Until the workers' latest assignments cover every request partition, none empty: a
    rebalance during the run would move sessions and measure that instead."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        counts = []
        for proc in fleet.procs:
            text = proc.log_path.read_text(errors="replace") if proc.log_path else ""
            lines = [json.loads(x) for x in text.splitlines()
                     if '"partitions_assigned"' in x and x.startswith("{")]
            counts.append(lines[-1]["count"] if lines else 0)
        if min(counts) > 0 and sum(counts) == partitions:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"group not settled within {within_s}s; see {fleet.log_dir}")


async def run_mode(spec: AffinitySpec, mode: str, engine_args: list[str], *, workers: int,
                   env: dict[str, str], log_dir: Path, timeout_s: float
                   ) -> tuple[dict[str, Any], list[Turn]]:
    """One mode on a fresh fleet: the counters' deltas and what the conversations did."""
    from streamer.topics import load_specs, worker_topics

    async with local_fleet(engine_args, log_dir=log_dir, workers=workers, env=env) as fleet:
        lanes = set(worker_topics(fleet.prefix)[:4])
        await wait_settled(fleet.fleet, sum(s.partitions for s in load_specs(fleet.prefix)
                                            if s.name in lanes))
        ports = [metrics_port(p.log_path) for p in fleet.fleet.procs]
        if any(p is None for p in ports):
            raise RuntimeError(f"a worker's metrics port is not in its log; see {log_dir}")
        before = await prefix_counters([p for p in ports if p is not None])
        began = time.monotonic()
        turns = await run_conversations(fleet.kafka, fleet.prefix, spec, mode, timeout_s)
        wall = time.monotonic() - began
        after = await prefix_counters([p for p in ports if p is not None])
    per_worker = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    queries = sum(w["queries"] for w in per_worker)
    hits = sum(w["hits"] for w in per_worker)
    later = [t.ttft_ms for t in turns if t.turn > 0 and t.ttft_ms is not None]
    split = sum(1 for c in range(spec.conversations)
                if len({t.worker for t in turns if t.conversation == c}) > 1)
    return {"mode": mode, "wall_s": wall, "queries": queries, "hits": hits,
            "hit_ratio": hits / queries if queries else None, "per_worker": per_worker,
            "conversations_split": split,
            "failed": sum(1 for t in turns if t.outcome != str(EventType.COMPLETED)),
            "ttft_ms_later_turns_p50": statistics.median(later) if later else None,
            "turns": [asdict(t) | {"messages": len(t.messages)} for t in turns]}, turns


def markdown(spec: AffinitySpec, modes: dict[str, dict[str, Any]], ceiling: float | None,
             workers: int, settings: str) -> str:
    rows = ["| keyed by | prefix-cache hit ratio | hits / queries (tokens) | conversations "
            "split over workers | p50 TTFT of turns 2+ (ms) | wall (s) |",
            "|---|---|---|---|---|---|"]
    for mode, r in modes.items():
        ratio = f"{r['hit_ratio']:.3f}" if r["hit_ratio"] is not None else "-"
        ttft = r["ttft_ms_later_turns_p50"]
        rows.append(f"| {mode} | {ratio} | {r['hits']:.0f} / {r['queries']:.0f} | "
                    f"{r['conversations_split']} of {spec.conversations} | "
                    f"{f'{ttft:.0f}' if ttft is not None else '-'} | {r['wall_s']:.1f} |")
    return "\n".join([
        "# streamer bench affinity", "",
        f"{spec.conversations} conversations x {spec.turns} turns (system {spec.system_words} "
        f"words, user {spec.user_words} words, answers {spec.max_tokens} tokens), {workers} "
        f"workers, {settings}. Ceiling (one cache, no eviction): "
        f"{f'{ceiling:.3f}' if ceiling is not None else '-'}.", "", *rows])


def run_affinity_bench(spec: AffinitySpec, *, model: str, workers: int, worker_flags: list[str],
                       threads: int | None, modes: tuple[str, ...], out: Path,
                       timeout_s: float) -> int:
    """Every mode in turn, then the ceiling from the transcripts; results to `out`."""
    from streamer.bench import report
    from streamer.bench.results import machine_info
    from streamer.bench.suite import worker_env
    from streamer.config import EngineConfig
    from streamer.engine.model import load_tokenizer

    spec.validate()
    engine_args = ["--model", model, "--devices", "cpu", *worker_flags]
    if threads:
        engine_args += ["--torch-threads", str(threads)]
    results: dict[str, dict[str, Any]] = {}
    transcripts: dict[str, list[Turn]] = {}
    for mode in modes:
        print(f"affinity: keyed by {mode}: {workers} fresh workers, {spec.conversations} "
              f"conversations x {spec.turns} turns", flush=True)
        results[mode], transcripts[mode] = asyncio.run(run_mode(
            spec, mode, engine_args, workers=workers, env=worker_env(threads),
            log_dir=out / "affinity-logs" / mode, timeout_s=timeout_s))
    block = EngineConfig().block_size
    if "--block-size" in worker_flags:
        block = int(worker_flags[worker_flags.index("--block-size") + 1])
    hits, total = ceiling_hits(transcripts[modes[0]], load_tokenizer(model), block)
    ceiling = hits / total if total else None
    settings = " ".join(worker_flags) or "default worker settings"
    settings += f", --torch-threads {threads}" if threads else ""
    data = {"benchmark": "affinity", "machine": machine_info(), "spec": asdict(spec),
            "model": model, "workers": workers, "worker_flags": worker_flags,
            "threads": threads, "block_size": block, "ceiling_hit_ratio": ceiling,
            "ceiling_hits": hits, "ceiling_prompt_tokens": total, "modes": results}
    text = markdown(spec, results, ceiling, workers, settings)
    for path in report.write_results(out, "affinity", data, text):
        print(f"wrote {path}")
    print(text)
    return 0 if not any(r["failed"] for r in results.values()) else 1
