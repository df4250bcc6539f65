"""Unit tests of the intake's pure parts: backpressure, record identity, flights, cancels,
prepare (with a real tokenizer and chat templates), the token-limit rule."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord
from transformers import AutoTokenizer

from streamer.engine.limits import LimitError, TokenLimits, resolve_max_tokens
from streamer.engine.outputs import RequestStream
from streamer.health.monitor import Outage
from streamer.intake.backpressure import Backpressure
from streamer.intake.control import CancelRegistry
from streamer.intake.flights import Flight, Flights
from streamer.intake.prepare import Prepared, prepare
from streamer.intake.records import RecentlyFinished, RecordId
from streamer.observability.logging import RepeatSummary
from streamer.protocol import ErrorCode, GenerationRequest, valid_traceparent
from streamer.validation import Rejection, parse_request, record_size


def record(offset: int, value: bytes = b"v", timestamp: int = 1, partition: int = 0,
           headers: tuple = ()) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord("t", partition, offset, timestamp, 0, None, value, None, 0,
                          len(value), headers)


# -- backpressure

def test_a_full_lane_pauses_and_resumes_below_half() -> None:
    bp = Backpressure(lane_capacity=10, max_outstanding_outputs=100)
    assert bp.decide([0, 0, 10, 0], 0) == ({2}, set())
    assert bp.decide([0, 0, 9, 0], 0) == (set(), set())  # still paused: no flapping at the limit
    assert bp.decide([0, 0, 5, 0], 0) == (set(), set())
    assert bp.decide([0, 0, 4, 0], 0) == (set(), {2})
    assert bp.decide([0, 0, 4, 0], 0) == (set(), set())


def test_unacknowledged_outputs_pause_every_lane_until_half_drained() -> None:
    bp = Backpressure(lane_capacity=10, max_outstanding_outputs=100)
    assert bp.decide([0, 0, 0, 0], 100) == ({0, 1, 2, 3}, set())
    assert bp.output_pauses == 1 and bp.outputs_blocked
    assert bp.decide([0, 0, 0, 0], 60) == (set(), set())
    assert bp.decide([0, 0, 0, 0], 49) == (set(), {0, 1, 2, 3})
    assert not bp.outputs_blocked


# -- record identity and the recently-finished window

def test_a_new_record_at_a_finished_position_is_not_mistaken_for_the_old_one() -> None:
    recent = RecentlyFinished(capacity=3)
    old = RecordId.of(record(5, b"first", timestamp=100))
    recent.add(old)
    assert RecordId.of(record(5, b"first", timestamp=100)) in recent  # a redelivered copy
    assert RecordId.of(record(5, b"other", timestamp=100)) not in recent  # offsets were reset
    assert RecordId.of(record(5, b"first", timestamp=200)) not in recent
    assert RecordId.of(record(5, b"first", timestamp=100, partition=1)) not in recent


def test_recently_finished_is_bounded_oldest_first() -> None:
    recent = RecentlyFinished(capacity=3)
    ids = [RecordId.of(record(i)) for i in range(5)]
    for rid in ids:
        recent.add(rid)
    assert len(recent) == 3
    assert [rid in recent for rid in ids] == [False, False, True, True, True]


# -- flights

def _flight(request_id: str, offset: int, partition: int = 0) -> Flight:
    rec = record(offset, request_id.encode(), partition=partition)
    return Flight(GenerationRequest(id=request_id, prompt="x"), rec, RecordId.of(rec), "normal",
                  RequestStream(request_id), 1)


def test_flights_by_id_record_and_partition() -> None:
    flights = Flights()
    a, b = _flight("a", 1), _flight("b", 2, partition=1)
    flights.add(a)
    flights.add(b)
    assert flights.by_record(a.rid) is a and "a" in flights and len(flights) == 2
    assert flights.by_record(RecordId.of(record(1, b"changed"))) is None
    assert flights.in_partitions({("t", 1)}) == [b]
    assert flights.remove(a) and not flights.is_current(a)
    assert not flights.remove(a)  # a second removal is a no-op


def test_a_handed_back_flight_cannot_remove_its_successor() -> None:
    flights = Flights()
    old = _flight("a", 1)
    flights.add(old)
    flights.remove(old)
    new = _flight("a", 1)
    flights.add(new)
    assert not flights.remove(old)
    assert flights.is_current(new)


# -- cancels

def test_cancel_registry_prunes_by_time_even_when_cancels_arrive_out_of_order() -> None:
    registry = CancelRegistry(window_s=10)
    registry.add("late", at=105)  # a replay reads partitions one by one: times interleave
    registry.add("early", at=50)
    registry.add("mid", at=97)
    registry.prune(now=106)
    assert "early" not in registry and "mid" in registry and "late" in registry
    registry.prune(now=111)
    assert "mid" not in registry and "late" in registry


def test_cancel_registry_keeps_the_newest_cancel_of_an_id_and_is_bounded() -> None:
    registry = CancelRegistry(window_s=10, max_entries=2)
    registry.add("a", at=1)
    registry.add("a", at=20)
    registry.prune(now=25)
    assert "a" in registry
    registry.add("b", at=21)
    registry.add("c", at=22)
    assert len(registry) == 2 and "a" not in registry


# -- prepare: templates, tokenization, limits

@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_model)


LIMITS = TokenLimits(context=256, default_max_tokens=16)


def test_prepare_renders_messages_and_applies_limits(tokenizer) -> None:  # type: ignore[no-untyped-def]
    req = msgspec.convert({"id": "a", "messages": [{"role": "user", "content": "hi"}]},
                          GenerationRequest)
    out = prepare(req, tokenizer, LIMITS)
    assert isinstance(out, Prepared) and out.params.max_tokens == 16
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert out.prompt_ids == tokenizer(text, add_special_tokens=False).input_ids


def test_a_template_that_raises_is_a_rejection_naming_its_message(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "strict"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == messages[loop.index0 - 1]['role'] and "
        "loop.index0 > 0 %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    strict = AutoTokenizer.from_pretrained(path)
    req = msgspec.convert({"id": "x", "messages": [{"role": "user", "content": "a"},
                                                   {"role": "user", "content": "b"}]},
                          GenerationRequest)
    out = prepare(req, strict, LIMITS)
    assert isinstance(out, Rejection) and out.code is ErrorCode.INVALID_REQUEST
    assert "roles must alternate" in out.message


def test_limits_never_clamp_a_given_value() -> None:
    assert resolve_max_tokens(250, None, LIMITS) == 6  # omitted: the room left
    assert resolve_max_tokens(10, 246, LIMITS) == 246
    for n, requested, code in [(10, 247, ErrorCode.CONTEXT_LENGTH_EXCEEDED),
                               (10, 300, ErrorCode.MAX_TOKENS_TOO_LARGE),
                               (256, None, ErrorCode.PROMPT_TOO_LONG),
                               (0, None, ErrorCode.INVALID_FIELD)]:
        with pytest.raises(LimitError) as info:
            resolve_max_tokens(n, requested, LIMITS)
        assert info.value.code is code


# -- validation: headers count, echoes are bounded, traceparent

def test_header_bytes_count_toward_the_record_limit() -> None:
    headers = [("x", b"a" * 2000)]
    assert record_size(b"{}", headers) == 2 + 1 + 2000
    from streamer.validation import RequestLimits
    out = parse_request(b'{"id": "a", "prompt": "x"}', headers, RequestLimits(max_message_bytes=1000))
    assert out.code is ErrorCode.MESSAGE_TOO_LARGE  # type: ignore[union-attr]


def test_an_unknown_protocol_header_is_not_echoed_unbounded() -> None:
    out = parse_request(b'{"id": "a", "prompt": "x"}', [("streamer-protocol", b"9" * 600_000)])
    assert isinstance(out, Rejection) and out.code is ErrorCode.UNSUPPORTED_PROTOCOL
    assert len(out.message) < 300


def test_only_a_well_formed_traceparent_is_kept() -> None:
    good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert valid_traceparent(good) == good
    assert valid_traceparent(good + b"0") is None
    assert valid_traceparent(b"00-" + b"f" * 100_000) is None
    assert valid_traceparent(None) is None


# -- outage logging

def test_an_outage_is_logged_at_start_every_30s_and_at_the_end() -> None:
    outage = Outage(every_s=30)
    lines = [outage.observe(ok, t) for ok, t in
             [(True, 0), (False, 1), (False, 2), (False, 30), (False, 31), (True, 40), (True, 41)]]
    assert lines == [None, "down", None, None, "down", "up", None]


def test_repeated_client_lines_are_summarised() -> None:
    clock = [0.0]
    summary = RepeatSummary("aiokafka", window_s=60, clock=lambda: clock[0])
    make = lambda node: logging.LogRecord("aiokafka.conn", logging.ERROR, "f", 1,  # noqa: E731
                                          "Unable connect to node with id %s", (node,), None)
    passed = []
    for i in range(100):
        clock[0] = i * 0.5
        rec = make(i)
        if summary.filter(rec):
            passed.append(rec.getMessage())
    clock[0] = 61
    last = make(1)
    assert summary.filter(last)
    assert len(passed) == 1 and "[and 99 similar lines" in last.getMessage()
    other = logging.LogRecord("streamer", logging.ERROR, "f", 1, "mine", (), None)
    assert all(summary.filter(other) for _ in range(3))
