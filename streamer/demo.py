"""`make demo`: embedded broker, topics, a tiny model, two workers, a dozen prompts, a summary."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from streamer.broker import EmbeddedBroker
from streamer.client import RequestHandle, StreamerClient, UpdateKind
from streamer.config import KafkaSettings
from streamer.fleet import Fleet
from streamer.tiny_model import TinyModelSpec, ensure_tiny_model
from streamer.topics import apply_topics

PROMPTS = [
    ("urgent", "The fire alarm in the server room says"),
    ("urgent", "Quick answer: the capital of France is"),
    ("high", "Write a haiku about message queues:"),
    ("high", "Three reasons to batch requests are"),
    ("high", "The weather tomorrow will be"),
    ("normal", "Once upon a time, in a data center far away,"),
    ("normal", "Kafka partitions keep messages ordered because"),
    ("normal", "A good commit message explains"),
    ("normal", "The recipe for a perfect cup of tea:"),
    ("low", "Summarise the history of computing in one paragraph:"),
    ("low", "List every prime number below fifty:"),
    ("low", "In a distant galaxy, a small robot"),
]
STATE_DIR = Path(".streamer")


@dataclass
class Row:
    priority: str
    prompt: str
    handle: RequestHandle
    submitted: float
    text: str = ""
    first_token: float | None = None
    finished: float | None = None
    outcome: str = "…"
    tokens: int = 0
    worker: str = ""
    attempts: int = 0
    events: list[str] = field(default_factory=list)


def _live_table(rows: list[Row]) -> Table:
    table = Table(title="streamer demo: live", expand=True)
    table.add_column("priority", width=8)
    table.add_column("state", width=10)
    table.add_column("text so far", overflow="ellipsis", no_wrap=True)
    for row in rows:
        table.add_row(row.priority, row.outcome, row.text.replace("\n", " ")[-90:])
    return table


def _summary(rows: list[Row]) -> Table:
    table = Table(title="summary")
    for name in ("priority", "outcome", "tokens", "TTFT ms", "total ms", "worker", "attempts"):
        table.add_column(name, justify="right" if "ms" in name or name == "tokens" else "left")
    for row in rows:
        ttft = f"{(row.first_token - row.submitted) * 1000:.0f}" if row.first_token else "-"
        total = f"{(row.finished - row.submitted) * 1000:.0f}" if row.finished else "-"
        table.add_row(
            row.priority, row.outcome, str(row.tokens), ttft, total, row.worker, str(row.attempts)
        )
    return table


async def _follow(row: Row) -> None:
    async for update in row.handle.updates():
        if update.kind is UpdateKind.TEXT:
            row.first_token = row.first_token or time.monotonic()
            row.text += update.text
        elif update.kind is UpdateKind.RESTART:
            row.text = ""
        elif update.event is not None:
            row.outcome = str(update.event.type)
            row.worker = update.event.worker
    result = await row.handle.result()
    row.finished = time.monotonic()
    row.text = result.text
    row.outcome = str(result.outcome.type)
    row.attempts = result.attempts_seen
    row.tokens = result.outcome.usage.completion_tokens if result.outcome.usage else 0


async def _wait_for_workers(fleet: Fleet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [
            p.log_path.read_text(errors="replace") if p.log_path and p.log_path.exists() else ""
            for p in fleet.procs
        ]
        if all("worker_started" in text for text in logs):
            return
        for proc in fleet.procs:
            if proc.process is not None and proc.process.returncode not in (None, 0):
                raise RuntimeError(f"worker {proc.index} exited; see {proc.log_path}")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"workers not started within {timeout}s; see {STATE_DIR / 'demo-logs'}")


async def run_demo(*, fast: bool = False, workers: int = 2) -> int:
    console = Console()
    max_tokens = 12 if fast else 48
    console.print("[bold]1/5[/] starting the embedded broker (Tansu, memory storage)")
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        console.print(f"      broker on {broker.bootstrap_servers}")
        console.print("[bold]2/5[/] creating topics from topics/*.yaml")
        report = await apply_topics(kafka)
        console.print("      " + ", ".join(report.created or report.unchanged))
        console.print("[bold]3/5[/] preparing a tiny Llama-family model (offline, random weights)")
        model = ensure_tiny_model(STATE_DIR / "models" / "tiny", TinyModelSpec())
        console.print(f"      {model}")
        console.print(f"[bold]4/5[/] starting a fleet of {workers} workers in one consumer group")
        fleet = Fleet(
            # One torch thread each: two workers share this machine's cores.
            ["--model", str(model), "--bootstrap-servers", broker.bootstrap_servers,
             "--torch-threads", "1"],
            workers=workers,
            base_metrics_port=0,
            log_dir=STATE_DIR / "demo-logs",
            env={"STREAMER_LOG_LEVEL": "INFO"},
        )
        await fleet.start()
        try:
            await _wait_for_workers(fleet, timeout=180)
            console.print(f"[bold]5/5[/] sending {len(PROMPTS)} prompts across the four priorities")
            async with StreamerClient(kafka) as client:
                rows = []
                for priority, prompt in PROMPTS:
                    handle = await client.submit(prompt, priority=priority, max_tokens=max_tokens)
                    rows.append(Row(priority, prompt, handle, time.monotonic()))
                followers = asyncio.gather(*(_follow(row) for row in rows))
                with Live(_live_table(rows), console=console, refresh_per_second=8) as live:
                    while not followers.done():
                        live.update(_live_table(rows))
                        await asyncio.sleep(0.1)
                    live.update(_live_table(rows))
                await asyncio.wait_for(followers, timeout=300)
        finally:
            await fleet.stop()
    console.print(_summary(rows))
    ok = all(row.outcome == "completed" for row in rows)
    console.print(
        "[green]all requests completed[/]" if ok else "[red]some requests did not complete[/]"
    )
    return 0 if ok else 1
