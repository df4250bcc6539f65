"""When a request's new tokens go to Kafka: one chunk per flush window, not one per token.

Kafka's cost is per record, not per byte, so a worker that publishes every token as its own record
puts thousands of records per second on the broker. The rule here (pure, clock passed in):

* the first token of an attempt is sent at once (time to first token never grows);
* later tokens accumulate and go out when `window_s` has passed since the last chunk was sent, or
  when `max_tokens` have accumulated, whichever comes first;
* anything accumulated is sent before any other output of the request (a preemption notice, the
  terminal event), so a terminal event still follows every chunk of its attempt.

Chunks keep their meaning: `index` is the completion index of the chunk's first token and the
text is the concatenation of the merged deltas (stop-string hold-back happened upstream, in the
detokenizer, so the concatenated chunks still equal the final text). A window of 0 sends every
output as it comes.

Under load the window stretches (`ChunkBudget`): a worker's token chunks are held to about
`records_per_s` records a second in all, so with S streams each waits about S / records_per_s
between chunks. One stream still gets the plain window; 64 streams on a slow step get fewer,
larger chunks and the broker's load stays flat as concurrency grows. `max_tokens` still caps a
chunk, so on fast hardware a stretched window ends after that many steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamer.engine.outputs import OutputKind, RequestOutput


@dataclass
class ChunkBudget:
    """The worker-wide record budget every attempt's `Coalescer` shares (one event loop: plain
    counters). `streams` is the number of attempts that are producing tokens right now."""

    window_s: float
    records_per_s: float = 0.0
    """0: no budget, every stream uses `window_s`."""
    streams: int = 0

    def window(self) -> float:
        if self.records_per_s <= 0:
            return self.window_s
        return max(self.window_s, self.streams / self.records_per_s)


@dataclass
class Coalescer:
    window_s: float
    max_tokens: int
    budget: ChunkBudget | None = None
    """When set, the window comes from it (`window_s` is then unused)."""
    _pending: RequestOutput | None = field(default=None, init=False)
    _last_sent: float | None = field(default=None, init=False)

    def push(self, out: RequestOutput, now: float) -> list[RequestOutput]:
        """Outputs to send now, in order, after `out` arrived at `now`."""
        if out.kind is not OutputKind.TOKENS:
            return [*self.take(now), out]
        if self._pending is None:
            self._pending = RequestOutput(
                out.request_id, OutputKind.TOKENS, index=out.index,
                token_ids=list(out.token_ids), text=out.text,
            )
        else:
            self._pending.merge(out)
        full = len(self._pending.token_ids) >= self.max_tokens
        if self._last_sent is None or full or self.due(now):
            return self.take(now)
        return []

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def deadline(self) -> float | None:
        """When the pending tokens must go out (None: nothing pending)."""
        if self._pending is None:
            return None
        if self._last_sent is None:
            return float("-inf")
        return self._last_sent + self.window()

    def window(self) -> float:
        return self.window_s if self.budget is None else self.budget.window()

    def take(self, now: float) -> list[RequestOutput]:
        """Send what is pending now (a flush)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        self._last_sent = now
        return [pending]
