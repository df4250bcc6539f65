"""Tests for incremental detokenization (streamer.engine.detokenizer).

The contract under test: the deltas returned by push() and finish() concatenate to
``tokenizer.decode(pushed_ids, skip_special_tokens=True)`` cut before the first stop
string, and every intermediate concatenation is a prefix of that final text (so no broken
character and no text after a stop is ever published). Tokenizers are trained locally:
byte-level BPE (GPT-2 style), Metaspace BPE (SentencePiece style), WordPiece with
transformers' space cleanup, and a hand-built Llama-style byte-fallback vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from streamer.engine.detokenizer import (
    IncrementalDetokenizer,
    _cleanup_safe_cut,
    find_stop,
    stop_prefix_holdback,
)

CORPUS = [
    "Hello world, this isn't a test. I'm sure it's fine . We've seen they're here !",
    "你好世界，这是一个测试。中文文本和标点符号。",
    "日本語のテキスト と 한국어 텍스트 — ελληνικά κείμενα",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 flags 🇯🇵 café naïve e\u0301 Zu\u0308rich ﬁ",
    "def f(x):\n    return x  # tabs\tand spaces   end",
] * 10

SPECIALS = ["<unk>", "<s>", "</s>"]

PROFILE = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NO_DEADLINE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Hypothesis times each example (200 ms by default): never on a machine that may be busy."""


def _wrap(tokenizer: Tokenizer, **kwargs: Any) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, small vocab so many characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=340,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def _metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece style: decode strips the leading space of the first token only."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def _wordpiece_with_cleanup() -> PreTrainedTokenizerFast:
    """BERT style, and decode() applies clean_up_tokenization (" ' " -> "'", ...)."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok, clean_up_tokenization_spaces=True)


BYTE_FALLBACK_PIECES = ["▁", "▁the", "▁a", "a", "b", "中", ".", "▁n't", "▁'", "s", "▁."]


def _byte_fallback() -> PreTrainedTokenizerFast:
    """Llama-2 style: <0xAB> byte tokens, decoded run by run (all-or-nothing UTF-8)."""
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in BYTE_FALLBACK_PIECES:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return _wrap(tok)


TOKENIZERS = {
    "byte_level": _byte_level_bpe(),
    "metaspace": _metaspace_bpe(),
    "wordpiece_cleanup": _wordpiece_with_cleanup(),
    "byte_fallback": _byte_fallback(),
}
BPE = TOKENIZERS["byte_level"]


class _Recorder(logging.Handler):
    """Collects warnings: a divergence from full decode is a bug even if output matches."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


WARNINGS = _Recorder()
logging.getLogger("streamer.engine.detokenizer").addHandler(WARNINGS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = _bytes_to_unicode()


def byte_ids(text: str, tok: PreTrainedTokenizerFast = BPE) -> list[int]:
    """One single-byte token per UTF-8 byte of ``text`` (byte-level BPE)."""
    ids = [tok.convert_tokens_to_ids(BYTE_CHARS[b]) for b in text.encode()]
    assert all(isinstance(i, int) for i in ids)
    return ids


def expected(
    tok: Any, ids: Sequence[int], stops: Sequence[str], skip: bool = True
) -> tuple[str, bool]:
    """The contract, computed the slow and obvious way."""
    full = tok.decode(list(ids), skip_special_tokens=skip)
    hits = [i for i in (full.find(s) for s in stops if s) if i != -1]
    return (full[: min(hits)], True) if hits else (full, False)


def run(
    tok: Any,
    chunks: Sequence[Sequence[int]],
    stops: Sequence[str] = (),
    skip: bool = True,
) -> tuple[list[str], IncrementalDetokenizer, list[int]]:
    """Push ``chunks`` until stopped, then finish. Returns deltas, detokenizer, pushed ids.

    Checks on the way that ``text`` tracks the deltas and that published text never
    contains a stop string.
    """
    WARNINGS.messages.clear()
    detok = IncrementalDetokenizer(tok, stop=stops, skip_special_tokens=skip)
    deltas: list[str] = []
    pushed: list[int] = []
    for chunk in chunks:
        deltas.append(detok.push(chunk))
        pushed.extend(chunk)
        published = "".join(deltas)
        assert detok.text == published
        assert not any(s and s in published for s in stops)
        if detok.stopped:
            break
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    assert WARNINGS.messages == []
    return deltas, detok, pushed


def assert_contract(
    tok: Any,
    chunks: Sequence[Sequence[int]],
    stops: Sequence[str] = (),
    skip: bool = True,
) -> list[str]:
    deltas, detok, pushed = run(tok, chunks, stops, skip)
    want, want_stopped = expected(tok, pushed, stops, skip)
    published = ""
    for delta in deltas:
        published += delta
        assert want.startswith(published), (published, want)  # no text is ever retracted
    assert published == want
    assert detok.stopped == want_stopped
    return deltas


def chunked(ids: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Split ``ids`` into chunks of the given sizes (cycled; 0 = an empty push)."""
    chunks, i, k = [], 0, 0
    while i < len(ids):
        size = sizes[k % len(sizes)] if sizes else 1
        chunks.append(list(ids[i : i + size]))
        i += size
        k += 1
        if k > 4 * len(ids) + 4:  # only empty sizes: push the rest at once
            chunks.append(list(ids[i:]))
            break
    return chunks


# ---------------------------------------------------------------------------------------
# Helpers: find_stop / stop_prefix_holdback


def test_find_stop_basics() -> None:
    assert find_stop("hello world", ["world"], 0) == 6
    assert find_stop("hello world", ["xyz"], 0) is None
    assert find_stop("abcabc", ["c", "ab"], 0) == 0  # the earliest start wins
    assert find_stop("abcabc", ["c", "ab"], 1) == 2
    assert find_stop("abcabc", ["bc", "abc"], 0) == 0
    assert find_stop("abc", ["", "c"], 0) == 2  # empty stops are ignored
    assert find_stop("", ["a"], 0) is None
    assert find_stop("a😀b", ["😀"], 0) == 1


def test_stop_prefix_holdback_basics() -> None:
    assert stop_prefix_holdback("hello wor", ["world"]) == 3
    assert stop_prefix_holdback("hello", ["world"]) == 0
    assert stop_prefix_holdback("hello world", ["world"]) == 0  # complete: not a prefix
    assert stop_prefix_holdback("xab", ["abc", "b"]) == 2
    assert stop_prefix_holdback("aaa", ["aaaa"]) == 3
    assert stop_prefix_holdback("", ["abc"]) == 0
    assert stop_prefix_holdback("abc", []) == 0
    assert stop_prefix_holdback("x\U0001f600", ["\U0001f600!"]) == 1


SMALL_TEXT = st.text(alphabet="ab😀\u0301", max_size=12)
STOPS = st.lists(st.text(alphabet="ab😀\u0301", max_size=4), max_size=4)


@NO_DEADLINE
@given(text=SMALL_TEXT, stops=STOPS, start=st.integers(0, 13))
def test_find_stop_matches_brute_force(text: str, stops: list[str], start: int) -> None:
    starts = [i for i in range(start, len(text)) for s in stops if s and text.startswith(s, i)]
    assert find_stop(text, stops, start) == (min(starts) if starts else None)


@NO_DEADLINE
@given(text=SMALL_TEXT, stops=STOPS)
def test_stop_prefix_holdback_matches_brute_force(text: str, stops: list[str]) -> None:
    want = max(
        (k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])),
        default=0,
    )
    assert stop_prefix_holdback(text, stops) == want


@NO_DEADLINE
@given(text=st.text(alphabet=" 'ntsmvre.?!,a", max_size=24), cut_at=st.integers(0, 24))
def test_cleanup_cut_is_exact(text: str, cut_at: int) -> None:
    """Cleaning before and after a safe cut equals cleaning the whole text."""
    clean = BPE.clean_up_tokenization
    cut = _cleanup_safe_cut(text[: min(cut_at, len(text))])
    assert clean(text) == clean(text[:cut]) + clean(text[cut:])


# ---------------------------------------------------------------------------------------
# Byte-level BPE: split characters, specials, stops


def test_fixture_has_tokens_that_split_characters() -> None:
    vocab = range(len(BPE))
    assert any("\ufffd" in BPE.decode([i]) for i in vocab)
    ids = BPE.encode("你好😀", add_special_tokens=False)
    assert any("\ufffd" in BPE.decode([i]) for i in ids)


@pytest.mark.parametrize("text", ["😀", "中", "é", "👨‍👩‍👧", "e\u0301", "🇯🇵", "a中b😀c"])
def test_split_characters_are_released_whole(text: str) -> None:
    deltas = assert_contract(BPE, [[i] for i in byte_ids(text)])
    assert "\ufffd" not in "".join(deltas)
    for delta in deltas:
        delta.encode("utf-8")  # every delta is valid text on its own


def test_emoji_bytes_one_at_a_time() -> None:
    ids = byte_ids("😀")
    detok = IncrementalDetokenizer(BPE)
    assert [detok.push([i]) for i in ids] == ["", "", "", "😀"]
    assert detok.finish() == ""
    assert detok.text == "😀"


def test_truncated_character_at_finish_is_what_decode_gives() -> None:
    ids = byte_ids("ok😀")[:-2]  # generation hit the length limit mid-character
    detok = IncrementalDetokenizer(BPE)
    assert "".join(detok.push([i]) for i in ids) == "ok"
    assert detok.finish() == BPE.decode(ids)[2:] == "\ufffd"
    assert detok.text == BPE.decode(ids)


def test_invalid_bytes_are_eventually_released() -> None:
    ids = byte_ids("a") + [BPE.convert_tokens_to_ids(BYTE_CHARS[0xFF])] * 6 + byte_ids("b")
    deltas = assert_contract(BPE, [[i] for i in ids])
    assert "".join(deltas) == "a" + "\ufffd" * 6 + "b"


def test_special_tokens_are_skipped() -> None:
    ids = [1, *BPE.encode("hi 你好", add_special_tokens=False), 2]
    assert "".join(assert_contract(BPE, [[i] for i in ids])) == "hi 你好"


def test_special_tokens_kept_when_not_skipping() -> None:
    ids = [1, *BPE.encode("hi", add_special_tokens=False), 2]
    deltas = assert_contract(BPE, [[i] for i in ids], skip=False)
    assert "".join(deltas) == "<s>hi</s>"


def test_stop_string_across_tokens() -> None:
    ids = BPE.encode("Hello world, this is a test.", add_special_tokens=False)
    deltas, detok, _ = run(BPE, [[i] for i in ids], stops=["is a"])
    assert "".join(deltas) == "Hello world, this "
    assert detok.stopped


def test_held_stop_prefix_is_released_when_it_does_not_complete() -> None:
    detok = IncrementalDetokenizer(BPE, stop=["abc"])
    assert detok.push(byte_ids("xa")) == "x"
    assert detok.push(byte_ids("b")) == ""
    assert detok.push(byte_ids("d")) == "abd"
    assert detok.finish() == ""
    assert not detok.stopped


def test_held_stop_prefix_is_released_at_finish() -> None:
    detok = IncrementalDetokenizer(BPE, stop=["abc"])
    assert detok.push(byte_ids("xab")) == "x"
    assert detok.finish() == "ab"
    assert detok.text == "xab"
    assert not detok.stopped


def test_earliest_stop_wins_within_one_push() -> None:
    deltas, detok, _ = run(BPE, [byte_ids("xyz abcd")], stops=["d", "abc", "z a"])
    assert "".join(deltas) == "xy"
    assert detok.stopped


def test_stop_made_of_split_characters() -> None:
    ids = byte_ids("ok 😀 done")
    deltas, detok, _ = run(BPE, [[i] for i in ids], stops=["😀"])
    assert "".join(deltas) == "ok "
    assert detok.stopped


def test_stop_at_the_very_start() -> None:
    deltas, detok, _ = run(BPE, [byte_ids("stop"), byte_ids("more")], stops=["stop"])
    assert deltas == ["", ""]
    assert detok.stopped and detok.text == ""


def test_push_after_stop_is_ignored_and_push_after_finish_fails() -> None:
    detok = IncrementalDetokenizer(BPE, stop=["b"])
    assert detok.push(byte_ids("abc")) == "a"
    assert detok.stopped
    assert detok.push(byte_ids("zzz")) == ""
    assert detok.finish() == ""
    assert detok.finish() == ""  # idempotent
    assert detok.text == "a"
    with pytest.raises(RuntimeError):
        detok.push(byte_ids("x"))


def test_stop_must_be_a_sequence_of_strings() -> None:
    with pytest.raises(TypeError):
        IncrementalDetokenizer(BPE, stop="abc")


def test_empty_generation() -> None:
    detok = IncrementalDetokenizer(BPE, stop=["x"])
    assert detok.push([]) == ""
    assert detok.finish() == ""
    assert detok.text == "" and not detok.stopped


def test_decode_work_is_linear() -> None:
    """Each push decodes a short window, not the whole sequence."""
    text = " ".join(CORPUS)
    ids = BPE.encode(text, add_special_tokens=False)
    assert len(ids) > 1500
    decoded_tokens = 0
    real_decode = BPE.decode

    def counting_decode(token_ids: list[int], **kwargs: Any) -> str:
        nonlocal decoded_tokens
        decoded_tokens += len(token_ids)
        return real_decode(token_ids, **kwargs)

    detok = IncrementalDetokenizer(BPE, stop=["never appears"])
    detok.push(ids[:1])  # compute the per-tokenizer facts outside the count
    BPE.decode = counting_decode  # type: ignore[method-assign]
    try:
        for i in ids[1:]:
            detok.push([i])
        detok.finish()
    finally:
        del BPE.decode  # back to the class attribute
    assert detok.text == real_decode(ids)
    # finish() decodes everything once; pushes decode a few tokens each.
    assert decoded_tokens < 8 * len(ids), decoded_tokens


# ---------------------------------------------------------------------------------------
# Other decoders


def test_metaspace_leading_space_and_skipped_specials() -> None:
    tok = TOKENIZERS["metaspace"]
    ids = tok.encode("Hello world", add_special_tokens=False)
    eos = tok.convert_tokens_to_ids("</s>")
    chunks = [[ids[0]], [eos], *([i] for i in ids[1:])]
    assert "".join(assert_contract(tok, chunks)) == "Hello world"


def test_wordpiece_cleanup_is_applied_incrementally() -> None:
    tok = TOKENIZERS["wordpiece_cleanup"]
    ids = tok.encode("I'm sure it's fine . isn't", add_special_tokens=False)
    assert tok.decode(ids) != tok.decode(ids, clean_up_tokenization_spaces=False)
    deltas = assert_contract(tok, [[i] for i in ids])
    assert "".join(deltas) == "I'm sure it's fine. isn't"


def test_byte_fallback_run_is_held_until_it_ends() -> None:
    tok = TOKENIZERS["byte_fallback"]
    run_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中中".encode()]
    the = tok.convert_tokens_to_ids("▁the")
    detok = IncrementalDetokenizer(tok)
    assert detok.push([the]) == "the"
    # Mid-run "中" decodes fine, but one more lone byte would turn the whole run into
    # U+FFFD, so nothing from the run may be released before the run ends.
    assert [detok.push([i]) for i in run_ids] == [""] * 6
    assert detok.push([the]) == "中中 the"


def test_byte_fallback_truncated_run_matches_decode() -> None:
    tok = TOKENIZERS["byte_fallback"]
    ids = [tok.convert_tokens_to_ids("a")]
    ids += [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中中".encode()[:4]]
    deltas = assert_contract(tok, [[i] for i in ids])
    assert "".join(deltas) == "a" + "\ufffd" * 4


def test_longer_stop_waits_for_text_held_in_a_byte_run() -> None:
    tok = TOKENIZERS["byte_fallback"]
    the = tok.convert_tokens_to_ids("▁the")
    zhong = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中".encode()]
    detok = IncrementalDetokenizer(tok, stop=["the中", "he"])
    # "he" is complete, but "the中" starts earlier and may complete inside the open run.
    assert detok.push([the, *zhong]) == ""
    assert not detok.stopped
    assert detok.push([tok.convert_tokens_to_ids("a")]) == ""
    assert detok.stopped
    assert detok.finish() == ""
    assert detok.text == ""


def test_longer_stop_waits_for_text_held_by_cleanup() -> None:
    tok = TOKENIZERS["wordpiece_cleanup"]
    ids = tok.encode("I'm sure it's", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["'", "s"]
    deltas = assert_contract(tok, [ids[:-1], ids[-1:]], stops=["sure it's", "it"])
    assert "".join(deltas) == "I'm "
    # Without the apostrophe held by cleanup, "it" completes first and is final.
    deltas = assert_contract(tok, [ids[:-2], ids[-2:]], stops=["sure it's", "it"])
    assert "".join(deltas) == "I'm sure "


class _RunDecoder:
    """A decoder outside the Hugging Face stack that rewrites released text for a while.

    Ids >= 256 are the letters a, b, c, ...; ids < 256 are raw bytes, and every run of
    bytes decodes all-or-nothing (like ByteFallback, but unknown to the detokenizer).
    """

    def decode(self, ids: list[int], **_: Any) -> str:
        out, run_bytes = [], bytearray()
        for i in [*ids, None]:
            if i is not None and i < 256:
                run_bytes.append(i)
                continue
            if run_bytes:
                try:
                    out.append(run_bytes.decode())
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run_bytes))
                run_bytes.clear()
            if i is not None:
                out.append(chr(ord("a") + i - 256))
        return "".join(out)


def test_text_rewritten_by_the_decoder_is_waited_out() -> None:
    tok = _RunDecoder()
    zhong = list("中".encode())
    detok = IncrementalDetokenizer(tok)
    assert detok.push([256]) == "a"
    assert [detok.push([b]) for b in zhong] == ["", "", "中"]
    # The run continues: the released "中" now decodes as U+FFFD until the run is valid.
    assert [detok.push([b]) for b in zhong] == ["", "", "中"]
    assert detok.push([257]) == "b"
    assert detok.finish() == ""
    assert detok.text == tok.decode([256, *zhong, *zhong, 257])


# ---------------------------------------------------------------------------------------
# Properties over random token sequences


@st.composite
def generations(draw: st.DrawFn, tok: Any) -> tuple[list[list[int]], list[str]]:
    """Random ids (specials and character-splitting ids included), chunking and stops."""
    vocab = len(tok)
    special = [tok.convert_tokens_to_ids(s) for s in SPECIALS]
    id_strategy = st.one_of(
        st.integers(0, vocab - 1), st.sampled_from(special), st.integers(vocab - 60, vocab - 1)
    )
    ids = draw(st.lists(id_strategy, max_size=40))
    if tok is BPE and draw(st.booleans()):
        # Real text with multi-byte characters, spelled one byte per token.
        text = draw(st.text(alphabet="ab 中😀é\u0301👍🏽", max_size=8))
        at = draw(st.integers(0, len(ids)))
        ids[at:at] = byte_ids(text)
    sizes = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    full = tok.decode(ids, skip_special_tokens=True)
    stops: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["substring", "nested", "random"]))
        if full and kind != "random":
            i = draw(st.integers(0, len(full) - 1))
            stop = full[i : i + draw(st.integers(1, 6))]
            stops.append(stop)
            if kind == "nested" and len(stop) > 1:
                # A shorter stop inside a longer one: the longer one starts first, so it
                # wins whenever it completes, even if the shorter one completes earlier.
                j = draw(st.integers(1, len(stop) - 1))
                stops.append(stop[j : j + draw(st.integers(1, len(stop) - j))])
        else:
            stops.append(draw(st.text(alphabet="ab 中😀\ufffd", min_size=1, max_size=3)))
    return chunked(ids, sizes), stops


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@PROFILE
@given(data=st.data())
def test_deltas_concatenate_to_the_final_text(name: str, data: st.DataObject) -> None:
    tok = TOKENIZERS[name]
    chunks, stops = data.draw(generations(tok))
    assert_contract(tok, chunks, stops)


@PROFILE
@given(data=st.data())
def test_deltas_concatenate_without_skipping_specials(data: st.DataObject) -> None:
    chunks, stops = data.draw(generations(BPE))
    assert_contract(BPE, chunks, stops, skip=False)


@PROFILE
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab .,'n 中文😀🎉👍🏽\u0301\u0308é🇯🇵\u200d👨")), max_size=30
    ),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    stop_len=st.integers(1, 4),
    data=st.data(),
)
def test_encoded_text_round_trips_with_stops(
    text: str, sizes: list[int], stop_len: int, data: st.DataObject
) -> None:
    """Real text (emoji, CJK, combining marks) through every tokenizer, cut at a stop."""
    for tok in TOKENIZERS.values():
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids, skip_special_tokens=True)
        stops = []
        if full:
            i = data.draw(st.integers(0, len(full) - 1))
            stops.append(full[i : i + stop_len])
        assert_contract(tok, chunked(ids, sizes))
        assert_contract(tok, chunked(ids, sizes), stops)
