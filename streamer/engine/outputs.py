"""What the engine hands back per request, and the per-request stream that carries it."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class OutputKind(enum.StrEnum):
    STARTED = "started"  # first scheduled
    TOKENS = "tokens"  # new tokens and their text delta
    PREEMPTED = "preempted"  # cache freed; it will resume without re-emitting tokens
    FINISHED = "finished"  # last output of the request


@dataclass
class RequestOutput:
    request_id: str
    kind: OutputKind
    index: int = 0
    """Index of the first token in `token_ids` within the completion."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    """Text delta for `token_ids` (held-back text is released later, never lost)."""
    finish_reason: str | None = None
    """eos, length, stop; or cancelled, expired, failed, revoked for aborted requests."""
    final_text: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    error: str | None = None
    first_token_at: float | None = None
    """Monotonic time of the first generated token (on FINISHED)."""
    started_at: float | None = None

    def merge(self, later: RequestOutput) -> bool:
        """Fold a later TOKENS output into this one (coalescing for slow consumers)."""
        if self.kind is not OutputKind.TOKENS or later.kind is not OutputKind.TOKENS:
            return False
        self.token_ids.extend(later.token_ids)
        self.text += later.text
        return True


class RequestStream:
    """Outputs of one request, coalesced when the consumer falls behind (never dropped)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._pending: deque[RequestOutput] = deque()
        self._ready = asyncio.Event()
        self.finished = False
        self.resumed_at = 0
        """Index of the first token this attempt generates (> 0 when it resumes an earlier one)."""

    def put(self, output: RequestOutput) -> None:
        if self._pending and self._pending[-1].merge(output):
            return
        self._pending.append(output)
        self._ready.set()

    async def get(self) -> RequestOutput:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        output = self._pending.popleft()
        if output.kind is OutputKind.FINISHED:
            self.finished = True
        return output

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()
