"""What a cache entry holds, and the stream that replays it (pure apart from the stream).

An entry is what a completed attempt published: each token chunk's ids and text, in order, and
what its `completed` event said (finish reason, text, usage). Replaying it publishes the same
chunks, with the same boundaries, under a fresh attempt.
"""

from __future__ import annotations

import time

import msgspec

from streamer.engine.outputs import OutputKind, RequestOutput, RequestStream


class Chunk(msgspec.Struct, array_like=True, frozen=True):
    token_ids: list[int]
    text: str


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    chunks: list[Chunk]
    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode(data: bytes) -> Entry | None:
    """The entry, or None for bytes that are not one (an older format, a corrupt file)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None


class Recorder:
    """Collects the chunks one attempt publishes, for the entry its completion stores."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []

    def chunk(self, token_ids: list[int], text: str) -> None:
        self.chunks.append(Chunk(list(token_ids), text))

    def entry(self, *, finish_reason: str, text: str, prompt_tokens: int,
              completion_tokens: int) -> Entry | None:
        """The entry, or None when the chunks do not add up to the outcome (never stored)."""
        ids = sum(len(c.token_ids) for c in self.chunks)
        if ids != completion_tokens or "".join(c.text for c in self.chunks) != text:
            return None
        return Entry(chunks=self.chunks, finish_reason=finish_reason, text=text,
                     prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


class ReplayStream(RequestStream):
    """A request stream already holding an entry's outputs: started, one TOKENS output per
    stored chunk (never merged, so the chunk boundaries stay), finished."""

    def __init__(self, request_id: str, entry: Entry) -> None:
        super().__init__(request_id)
        now = time.monotonic()
        self.put(RequestOutput(request_id, OutputKind.STARTED, started_at=now))
        index = 0
        for chunk in entry.chunks:
            self.put(RequestOutput(request_id, OutputKind.TOKENS, index=index,
                                   token_ids=list(chunk.token_ids), text=chunk.text))
            index += len(chunk.token_ids)
        self.put(RequestOutput(
            request_id, OutputKind.FINISHED, finish_reason=entry.finish_reason,
            final_text=entry.text, num_prompt_tokens=entry.prompt_tokens,
            num_completion_tokens=entry.completion_tokens, first_token_at=now, started_at=now,
        ))

    def put(self, output: RequestOutput) -> None:
        self._pending.append(output)  # no merging: each stored chunk is published as it was
        self._ready.set()
