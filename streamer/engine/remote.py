"""The model process: the pipeline (weights, KV pools, stages) in a child process of its own.

Why: a worker's event loop spends a large share of a core in Python (Kafka protocol encoding and
decoding, publishing, bookkeeping). A stage's forward on a small model is many short torch ops,
each of which must take the interpreter lock back when it returns; while the event loop holds
the lock, the forward stalls. Measured on the bench preset (docs/benchmarks.md): the same steps
ran ~50% longer inside the worker than in-process, and the worker never used more than one core.
In a process of its own the forward has its own interpreter lock.

The boundary is the pipeline's: `RemotePipeline` has `Pipeline`'s surface (start, stop, submit,
result, warm, depth, stages), so the engine's loop, scheduler and block manager stay in the
worker and are the same code either way. Per step, the worker sends the packed `StepBatch` (token
ids, block tables, the sampler's parameters) and gets the sampled token ids back; hidden states
never leave the child, which runs the stages on their threads exactly as in-process.

Failure: a model fault in a step comes back as that step's exception, as in-process. A child that
dies (killed, out of memory) is seen as end of file on its pipe: the engine loop fails with
`ModelProcessDied` and the worker exits non-zero, so its partitions and recorded progress move
to the rest of the fleet. A worker that dies closes the pipe and the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
import torch

from streamer.config import EngineConfig
from streamer.engine.loading import ModelSummary, load_stages
from streamer.engine.stages import Pipeline, StepBatch

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 10.0
_CHILD_COMMAND = ("import sys; from streamer.engine.remote import child_entry; "
                  "child_entry(int(sys.argv[1]))")


class ModelProcessDied(RuntimeError):
    """The model process exited while the engine needed it."""


@dataclass
class StageStatus:
    """A stage of the model process as the engine sees it (updated with every result)."""

    index: int
    busy_seconds: float = 0.0
    current: str = "idle"


# --------------------------------------------------------------------------- the wire


def _pack(batch: StepBatch) -> tuple[Any, ...]:
    """A step as plain lists (pickling tensors goes through torch.save: far slower)."""
    sampler = batch.sampler
    assert isinstance(sampler, functools.partial), "a remote step's sampler must be a partial"
    return (batch.input_ids.tolist(), batch.query_lens, batch.context_lens,
            [list(t) for t in batch.block_tables], batch.sample_rows.tolist(),
            sampler.func, sampler.args, sampler.keywords)


def _unpack(packed: tuple[Any, ...]) -> StepBatch:
    ids, query_lens, context_lens, tables, rows, func, args, keywords = packed
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        sample_rows=torch.tensor(rows, dtype=torch.long),
        sampler=functools.partial(func, *args, **keywords),
    )


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> tuple[Any, ...]:
    return pickle.loads(conn.recv_bytes())


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (torch.OutOfMemoryError does), else a
    RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- the child


def child_entry(fd: int) -> None:
    """`python -c` entry of the model process: its end of the socket pair, then its settings."""
    conn = Connection(fd)
    _, cfg, log_level = _recv(conn)
    child_main(conn, cfg, log_level)


def child_main(conn: Connection, cfg: EngineConfig, log_level: str) -> None:
    """The model process: load, say so, serve steps until told to stop or the worker is gone."""
    from streamer.observability.logging import configure_logging

    configure_logging(log_level)
    structlog.contextvars.bind_contextvars(process="model")
    try:
        stages, summary = load_stages(cfg)
    except BaseException as exc:  # the worker reports it as its own start-up error
        _send(conn, ("failed", _portable(exc)))
        return
    _send(conn, ("ready", summary))
    asyncio.run(_serve(conn, Pipeline(stages)))
    sys.stderr.flush()
    os._exit(0)  # nothing left to save: skip the interpreter's slow teardown of torch


async def _serve(conn: Connection, pipeline: Pipeline) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    threading.Thread(target=_pump, args=(conn, loop, inbox), name="model-inbox",
                     daemon=True).start()
    await pipeline.start()
    replies: asyncio.Task[None] | None = None
    try:
        while True:
            message = await inbox.get()
            kind = message[0]
            if kind == "step":
                if replies is None:  # from the first step on, results flow back in order
                    replies = asyncio.create_task(_reply(conn, pipeline))
                await pipeline.submit(_unpack(message[1]))
            elif kind == "warm" and replies is None:
                try:
                    compiled = await pipeline.warm([_unpack(s) for s in message[1]], message[2])
                    _send(conn, ("warmed", compiled))
                except Exception as exc:
                    _send(conn, ("warm_failed", _portable(exc)))
            else:  # "stop", or the worker is gone ("closed")
                return
    finally:
        if replies is not None:
            replies.cancel()
        await pipeline.stop()


async def _reply(conn: Connection, pipeline: Pipeline) -> None:
    while True:
        _, payload = await pipeline.result()
        if isinstance(payload, BaseException):
            log.error("model_step_failed", error=repr(payload)[:300])
            payload = _portable(payload)
        status = [(s.busy_seconds, s.current) for s in pipeline.stages]
        _send(conn, ("result", payload, status))


def _pump(conn: Connection, loop: asyncio.AbstractEventLoop,
          inbox: asyncio.Queue[tuple[Any, ...]]) -> None:
    """Blocking reads off the pipe (the lock is released while waiting), onto the loop."""
    while True:
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            message = ("closed",)
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, message)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            return
        if message[0] == "closed":
            return


# --------------------------------------------------------------------------- the worker's side


class RemotePipeline:
    """`Pipeline`'s surface, served by the model process."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection, model: str) -> None:
        self._process = process
        self._conn = conn
        self._model = model
        self.summary: ModelSummary | None = None
        self.stages: list[StageStatus] = []
        self._sent: deque[StepBatch] = deque()
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._reader: threading.Thread | None = None
        self._stopped = False

    @classmethod
    def launch(cls, cfg: EngineConfig) -> RemotePipeline:
        """Start the model process; it loads while the caller does other work, until
        `wait_loaded` (or `kill`)."""
        # A fresh interpreter, not fork (which would copy threads, locks and a CUDA context)
        # nor multiprocessing's spawn (which would run the caller's __main__ again).
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_COMMAND, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(ours.detach())
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        with contextlib.suppress(OSError):  # it died at once: wait_loaded says so
            _send(conn, ("load", cfg, level))
        return cls(process, conn, cfg.model)

    def wait_loaded(self) -> ModelSummary:
        """Block until the model is loaded; raises what the model process raised loading it."""
        try:
            kind, value = _recv(self._conn)
        except (EOFError, OSError):
            self._conn.close()
            code = _wait(self._process, STOP_TIMEOUT_S)
            raise ModelProcessDied(
                f"the model process exited with {code} while loading {self._model!r} "
                "(see its log lines above)") from None
        if kind == "failed":
            self._conn.close()
            _wait(self._process, STOP_TIMEOUT_S)
            raise value
        self.summary = value
        self.stages = [StageStatus(i) for i in range(len(value.ranges))]
        return value

    def kill(self) -> None:
        """Stop a model process that will not be used (start-up failed elsewhere)."""
        self._process.kill()
        _wait(self._process, STOP_TIMEOUT_S)
        self._conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def depth(self) -> int:
        return len(self.stages)

    async def start(self) -> None:
        if self._reader is not None:
            return
        self._reader = threading.Thread(
            target=_pump, args=(self._conn, asyncio.get_running_loop(), self._inbox),
            name="model-results", daemon=True)
        self._reader.start()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):  # already gone
            _send(self._conn, ("stop",))
        process = self._process
        if await asyncio.to_thread(_wait, process, STOP_TIMEOUT_S) is None:
            log.warning("model_process_kill", pid=process.pid, note="did not stop in time")
            process.kill()
            await asyncio.to_thread(_wait, process, STOP_TIMEOUT_S)
        self._conn.close()

    async def submit(self, batch: StepBatch) -> None:
        self._sent.append(batch)
        for stage in self.stages:
            stage.current = f"step in the model process (pid {self.pid})"
        with contextlib.suppress(OSError):  # gone: the reader sees the pipe end, result() says so
            _send(self._conn, ("step", _pack(batch)))

    async def result(self) -> tuple[StepBatch, list[int] | BaseException]:
        message = await self._inbox.get()
        batch = self._sent.popleft()
        if message[0] != "result":
            raise self._died()
        _, payload, status = message
        for stage, (busy, current) in zip(self.stages, status, strict=True):
            stage.busy_seconds, stage.current = busy, current
        return batch, payload

    def check(self) -> None:
        """Raise ModelProcessDied if the model process has exited (cheap: one waitpid)."""
        if self._process.poll() is not None:
            raise self._died()

    async def warm(self, steps: list[StepBatch], compile: bool) -> bool:
        """The model side of the warm-up, in the model process; whether the stages compiled."""
        _send(self._conn, ("warm", [_pack(s) for s in steps], compile))
        message = await self._inbox.get()
        if message[0] == "warmed":
            return bool(message[1])
        if message[0] == "warm_failed":
            raise message[1]
        raise self._died()

    def _died(self) -> ModelProcessDied:
        code = _wait(self._process, 1.0)
        return ModelProcessDied(f"the model process (pid {self.pid}) exited with {code}")


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code, or None if the process is still running after `timeout_s`."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None
