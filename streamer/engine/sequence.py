"""Internal state of one request inside the engine (mutable; never on the wire)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_EOS = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Resume:
    """Where an earlier attempt of the request stopped: the completion tokens it published (and
    the broker acknowledged), the characters of text they carried, and the seed it drew with."""

    token_ids: tuple[int, ...]
    text_chars: int
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One request's tokens and its place in the schedule (its KV blocks are the BlockManager's,
    under `request_id`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 2
    """Lane index: 0 = urgent ... 3 = low."""
    arrival: float = 0.0
    """Monotonic seconds when the engine received it (for FIFO and aging)."""
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens (prompt, then output) whose keys and values are in the cache."""
    group: int | None = None
    """Micro-batch group while running; None while waiting."""
    status: SeqStatus = SeqStatus.WAITING
    started_at: float | None = None
    """When it was first scheduled (for preemption order: most recently started goes first)."""
    num_preemptions: int = 0
    """Times it lost its KV blocks, to a higher lane or for lack of blocks (it resumes by
    recomputing what the prefix cache no longer holds, same attempt)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens to run before it samples again: 1 when decoding, more while (re)prefilling."""
        return self.num_tokens - self.num_computed
