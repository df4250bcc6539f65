"""Incremental detokenization with stop strings.

The wire protocol promises that the text deltas published for a request concatenate to
exactly the final text, where

    final text = tokenizer.decode(generated_ids, skip_special_tokens=True),
                 cut before the first occurrence of any stop string.

:class:`IncrementalDetokenizer` keeps that promise while decoding only a small window of
recent tokens per step (the vLLM prefix_offset/read_offset scheme), so a request costs
O(n) decode work instead of O(n^2). Text is released in three stages:

1. *Window decoding* turns token ids into raw text. The window starts a chunk of tokens
   before the unreleased ones, so context-dependent decoders (SentencePiece's leading
   space, WordPiece's ``##`` joins) decode the new tokens exactly as the full sequence
   would, and the delta is the difference against the window's already released text.
   Text that later tokens may still change is held back: trailing U+FFFD (a multi-byte
   character split across byte-level tokens) and unfinished byte-fallback runs.
2. *Space cleanup*, only for tokenizers whose ``decode`` applies transformers'
   ``clean_up_tokenization`` (" ." -> "." and friends): applied incrementally, holding
   back the few trailing characters a later token could still merge with.
3. *Stop strings*: the released text is searched for stop strings, and any tail that
   could still grow into one is held back, so text after a stop never leaks.

``finish()`` decodes the whole sequence once and releases the rest of it, which makes the
end of the stream exact even where incremental decoding had to hold text back.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["IncrementalDetokenizer", "find_stop", "stop_prefix_holdback"]

_log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"

# An incomplete UTF-8 sequence is at most 3 bytes long, and a byte-level decoder renders
# it as at most one U+FFFD per byte, so only the last 3 replacement characters of the
# text can still turn into something else. Earlier ones are permanent (invalid bytes).
_MAX_UNSETTLED_REPLACEMENTS = 3

# transformers' clean_up_tokenization deletes the space in " .", " ?", " !", " ,", " ' ",
# " n't", " 'm", " 's", " 've", " 're". Text that ends with a proper prefix of one of
# those patterns may still change when more text arrives; any other cut point splits the
# cleanup exactly (cleanup(a + b) == cleanup(a) + cleanup(b)), see _cleanup_safe_cut.
_CLEANUP_UNSAFE_SUFFIXES = (" ", " '", " n", " n'", " 'v", " 'r")


# --------------------------------------------------------------------------------------
# Stop-string helpers


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the first occurrence at or after ``start`` of any stop string, or None.

    "First" means the lowest start index; empty stop strings are ignored.
    """
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        # Once a match is known, only an occurrence starting before it matters.
        end = None if best is None else best - 1 + len(stop)
        i = text.find(stop, start, end)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def stop_prefix_holdback(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    That many trailing characters must not be published yet: the next characters may
    complete a stop string, and then they belong to the (unpublished) stop. Complete stop
    strings are found with :func:`find_stop`, not held back here.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


# --------------------------------------------------------------------------------------
# Per-tokenizer facts, computed once per tokenizer object


@dataclass(frozen=True, slots=True)
class _TokenizerInfo:
    """What the detokenizer needs to know about a tokenizer's decode()."""

    # Ids that decode(skip_special_tokens=True) drops (the backend's special tokens).
    special_ids: frozenset[int]
    # Ids of "<0xAB>" tokens when the decoder has a ByteFallback step, else empty.
    byte_fallback_ids: frozenset[int]
    # Whether decode() applies clean_up_tokenization to its output.
    cleans_up_spaces: bool


_INFO_CACHE: weakref.WeakKeyDictionary[Any, _TokenizerInfo] = weakref.WeakKeyDictionary()


def _tokenizer_info(tokenizer: Any) -> _TokenizerInfo:
    """The tokenizer's :class:`_TokenizerInfo`, cached: detokenizers are per request."""
    try:
        return _INFO_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    info = _TokenizerInfo(
        special_ids=_special_ids(tokenizer),
        byte_fallback_ids=_byte_fallback_ids(tokenizer),
        cleans_up_spaces=_cleans_up_spaces(tokenizer),
    )
    with contextlib.suppress(TypeError):  # unhashable or not weak-referenceable: no cache
        _INFO_CACHE[tokenizer] = info
    return info


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids the Rust backend skips when decoding with ``skip_special_tokens=True``.

    Dropping them before they enter the window keeps a skipped token from becoming the
    window's first token, where decoders treat the next real token as the start of the
    text (SentencePiece strips its leading space). Only fast (Rust-backed) tokenizers
    are handled; for others nothing is dropped, which is merely less exact at window
    starts, never wrong about which text exists.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return frozenset()
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(i for i, token in added.items() if getattr(token, "special", False))


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the 256 ``<0xAB>`` tokens, if the decoder has a ByteFallback step.

    ByteFallback decodes a run of byte tokens as one unit: if the run is not valid UTF-8
    yet, *every* byte becomes U+FFFD, including ones that already formed characters.
    Such a run can only be released once a non-byte token ends it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return frozenset()
    try:
        state = decoder.__getstate__()  # the decoder's JSON, nested Sequence included
    except Exception:
        return frozenset()
    if b'"ByteFallback"' not in (state if isinstance(state, bytes) else str(state).encode()):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


def _cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether ``tokenizer.decode()`` applies ``clean_up_tokenization`` by default.

    The flag alone is not enough (transformers 5 ignores it for BPE models), so probe a
    text the cleanup changes and compare decode with and without it. The probe has
    several patterns because decoders may already remove some themselves (the WordPiece
    decoder drops the space before "." and ",", but not around "'").
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        ids = tokenizer.encode("a . b , c ' d 's e n't f ? g !", add_special_tokens=False)
        return tokenizer.decode(ids) != tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    except Exception:
        return hasattr(tokenizer, "clean_up_tokenization")


# --------------------------------------------------------------------------------------
# Stage helpers


def _unsettled_replacements(text: str) -> int:
    """How many trailing U+FFFD of ``text`` later bytes could still complete."""
    n = 0
    while n < _MAX_UNSETTLED_REPLACEMENTS and n < len(text) and text[-1 - n] == REPLACEMENT_CHAR:
        n += 1
    return n


def _cleanup_safe_cut(raw: str) -> int:
    """Largest ``p`` such that cleanup(raw[:p] + later) == cleanup(raw[:p]) + cleanup(...).

    Every cleanup pattern starts with a space and only deletes spaces, so a pattern can
    only straddle the cut when the left side ends with a proper prefix of one.
    """
    cut = len(raw)
    while cut > 0 and raw.endswith(_CLEANUP_UNSAFE_SUFFIXES, 0, cut):
        cut -= 1
    return cut


class _SpaceCleanup:
    """Applies ``clean_up_tokenization`` to a text stream, piece by piece."""

    def __init__(self, clean: Callable[[str], str]) -> None:
        self._clean = clean
        self._held = ""

    @property
    def holding(self) -> bool:
        """Whether raw text is held back waiting for its right context."""
        return bool(self._held)

    def feed(self, raw: str) -> str:
        """Add raw text; return the cleaned text that can no longer change."""
        raw = self._held + raw
        cut = _cleanup_safe_cut(raw)
        self._held = raw[cut:]
        return self._clean(raw[:cut]) if cut else ""


# --------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into safe-to-publish text deltas.

    One instance per request. Call :meth:`push` with each batch of new ids (stop pushing
    once :attr:`stopped` is True) and :meth:`finish` when generation ends; publish every
    returned string. Their concatenation is exactly
    ``tokenizer.decode(ids, skip_special_tokens=...)`` cut before the first stop string,
    where ``ids`` are the ids pushed up to and including the push that set :attr:`stopped`.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str):  # a lone string would silently become one stop per char
            raise TypeError("stop must be a sequence of strings, not a string")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        info = _tokenizer_info(tokenizer)
        self._dropped_ids = info.special_ids if skip_special_tokens else frozenset()
        self._byte_ids = info.byte_fallback_ids
        self._cleanup = (
            _SpaceCleanup(tokenizer.clean_up_tokenization) if info.cleans_up_spaces else None
        )
        self._stops = tuple(dict.fromkeys(s for s in stop if s))  # dedupe; "" never matches

        # Stage 1: the token window. ids[:_read] are fully released; the window is
        # ids[_prefix:], and _window_text is the released prefix of its decoded text.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._window_text = ""

        # Stage 3: text released by stages 1-2 but held back for stop strings.
        self._pending = ""
        self._chunks: list[str] = []  # every delta returned so far
        self._text: str | None = ""  # "".join(_chunks), rebuilt lazily
        self._stopped = False
        self._finished = False

    # -- public API -----------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """A stop string was seen: the text is final, further pushes are ignored."""
        return self._stopped

    @property
    def finished(self) -> bool:
        """:meth:`finish` was called."""
        return self._finished

    @property
    def text(self) -> str:
        """Concatenation of every delta so far; after :meth:`finish`, the final text."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """The ids pushed so far, minus skipped special tokens (a copy)."""
        return list(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add newly generated token ids; return the text delta now safe to publish.

        The delta may be empty (text held back for an incomplete character, a possible
        stop string, ...). After a stop string was seen the ids are ignored and "" is
        returned, so tokens generated in the same engine step as the stop are harmless.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        if self._stopped:
            return ""
        dropped = self._dropped_ids
        self._ids.extend(int(t) for t in token_ids if int(t) not in dropped)
        raw = self._decode_window()
        if self._cleanup is not None:
            raw = self._cleanup.feed(raw)
        return self._release(raw, final=False)

    def finish(self) -> str:
        """Generation ended: return all remaining held-back text (idempotent)."""
        if self._finished:
            return ""
        self._finished = True
        if self._stopped:
            return ""
        return self._release(self._final_tail(), final=True)

    # -- stage 1: window decoding -----------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        # Cleanup is non-local, so windows are decoded raw and stage 2 applies it.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _releasable_limit(self) -> int:
        """End of the token range whose text may be released (excludes open byte runs)."""
        limit = len(self._ids)
        if self._byte_ids:
            while limit > self._read and self._ids[limit - 1] in self._byte_ids:
                limit -= 1
        return limit

    def _decode_window(self) -> str:
        """Decode the window; return the newly released raw text."""
        limit = self._releasable_limit()
        if limit <= self._read:
            return ""
        new = self._decode(self._ids[self._prefix : limit])
        if not new.startswith(self._window_text):
            # Text released earlier decodes differently now: the decoder is mid-way
            # through something that rewrites it (e.g. an unterminated byte run). Wait.
            return ""
        end = max(len(new) - _unsettled_replacements(new), len(self._window_text))
        delta = new[len(self._window_text) : end]
        self._window_text = new[:end]
        if end == len(new):
            self._advance_window(limit)
        return delta

    def _advance_window(self, limit: int) -> None:
        """All text of ids[:limit] is released: slide the window forward.

        The new window starts at the previous read position, so it keeps the last
        released chunk as context for the next tokens. Keep the old start instead if
        that chunk decodes to nothing or to replacement characters (a start in the middle
        of a character or byte run would make the window's text unreliable).
        """
        start, self._read = self._read, limit
        if start > self._prefix:
            baseline = self._decode(self._ids[start:limit])
            if baseline and REPLACEMENT_CHAR not in baseline:
                self._prefix = start
                self._window_text = baseline

    def _holding(self) -> bool:
        """Whether stages 1-2 hold text that the stop search has not seen yet."""
        return self._read < len(self._ids) or (self._cleanup is not None and self._cleanup.holding)

    def _final_tail(self) -> str:
        """Everything after the text already released by stages 1-2, from a full decode.

        One O(n) decode per request buys exactness at the end of the stream, where the
        incremental stages may still hold text (a character cut off by the length limit,
        an unterminated byte run, trailing spaces awaiting cleanup).
        """
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        produced = self.text + self._pending
        if not full.startswith(produced):
            # Incremental decoding diverged from a full decode: a decoder whose output
            # changes beyond the window. Published text cannot be taken back, so this is
            # best effort; tests treat this warning as a failure.
            _log.warning(
                "incremental detokenization diverged from full decode after %d chars",
                len(produced),
            )
        return full[len(produced) :]

    # -- stage 3: stop strings --------------------------------------------------------

    def _release(self, new_text: str, *, final: bool) -> str:
        """Append released text, search stop strings, return what may be published."""
        pending = self._pending + new_text
        cut = len(pending)
        if self._stops and pending:
            # Invariant: published text never contains the start of a stop string (its
            # possible starts are always held back), so searching `pending` suffices.
            hit = find_stop(pending, self._stops)
            if not final:
                cut = len(pending) - stop_prefix_holdback(pending, self._stops)
            if hit is not None and (final or cut >= hit or not self._holding()):
                self._stopped = True
                cut = hit
                pending = pending[:hit]
            # else: a longer stop string may start before `hit` and end in text still
            # held by stages 1-2; it would be the first occurrence. Wait for that text.
        delta, self._pending = pending[:cut], pending[cut:]
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta
