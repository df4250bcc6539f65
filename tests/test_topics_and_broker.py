"""Topics as code and the embedded broker command, against a real broker."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import ROOT

from streamer.broker import free_port, port_open
from streamer.config import KafkaSettings
from streamer.topics import apply_topics, load_specs

pytestmark = pytest.mark.kafka

EXPECTED = {"requests.urgent", "requests.high", "requests.normal", "requests.low", "tokens",
            "events", "control", "requests.dlq", "workers"}


def test_specs_cover_every_topic_with_every_field() -> None:
    specs = load_specs("acme")
    assert {s.name.removeprefix("acme.") for s in specs} == EXPECTED
    for spec in specs:
        assert spec.partitions >= 1 and spec.replication_factor >= 1 and spec.retention_ms > 0
        assert spec.cleanup_policy in ("delete", "compact") and spec.purpose


async def test_apply_is_idempotent_and_reports_differences(kafka_settings: KafkaSettings) -> None:
    prefix = f"a{uuid.uuid4().hex[:8]}"
    # One topic exists already, with a partition count that differs from its spec.
    admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{prefix}.tokens", 2, 1)])
    finally:
        await admin.close()
    first = await apply_topics(kafka_settings, prefix)
    assert sorted(first.created) == sorted(f"{prefix}.{n}" for n in EXPECTED - {"tokens"})
    assert any(d.startswith(f"{prefix}.tokens: partitions 2 (spec 12)") for d in first.differences)
    second = await apply_topics(kafka_settings, prefix)
    assert second.created == []
    assert len(second.unchanged) == len(EXPECTED) - 1
    assert second.differences == first.differences  # reported, never changed


def test_topics_command_twice(kafka_bootstrap: str) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "streamer.cli", "topics", "apply", "--prefix", prefix,
               "--bootstrap-servers", kafka_bootstrap]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    second = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.count("created") == len(EXPECTED)
    assert second.stdout.count("ok ") == len(EXPECTED) and "created" not in second.stdout


def test_broker_command_prints_ready_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamer.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"broker ready on 127.0.0.1:{port}" in line
        assert port_open("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not port_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
