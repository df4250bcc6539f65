"""Topics as code and the embedded broker command, against a real broker."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from conftest import ROOT

from streamer.broker import free_port, port_open
from streamer.config import KafkaSettings
from streamer.topics import (
    TopicsError,
    apply_topics,
    load_specs,
    missing_topics,
    replication_plan,
    worker_topics,
)

pytestmark = pytest.mark.kafka

EXPECTED = {"requests.urgent", "requests.high", "requests.normal", "requests.low", "tokens",
            "events", "control", "requests.dlq", "progress",
            "workers"}


def test_specs_cover_every_topic_with_every_field() -> None:
    specs = load_specs("acme")
    assert {s.name.removeprefix("acme.") for s in specs} == EXPECTED
    for spec in specs:
        assert spec.partitions >= 1 and spec.replication_factor >= 1 and spec.retention_ms > 0
        assert spec.cleanup_policy in ("delete", "compact", "compact,delete") and spec.purpose


def test_specs_say_what_production_needs() -> None:
    specs = load_specs("llm")
    assert {s.name for s in specs} == set(worker_topics("llm"))
    for spec in specs:
        assert (spec.replication_factor, spec.min_insync_replicas) == (3, 2), spec.name
        assert spec.configs()["min.insync.replicas"] == "2"
    retention = {s.name.removeprefix("llm."): s.retention_ms for s in specs}
    assert retention["tokens"] < retention["events"] < retention["requests.dlq"]


def test_replication_plan_clamps_spec_defaults_and_refuses_explicit_factors() -> None:
    specs = load_specs("llm")
    plan, notes = replication_plan(specs, brokers=1, requested=None)
    assert set(plan.values()) == {1}
    (note,) = notes
    assert f"replication factor 1 instead of the spec's 3 for {len(EXPECTED)} topics" in note
    assert "the cluster has 1 broker" in note
    assert replication_plan(specs, brokers=5, requested=None) == ({s.name: 3 for s in specs}, [])
    assert set(replication_plan(specs, brokers=1, requested=1)[0].values()) == {1}
    with pytest.raises(TopicsError, match="needs at least 3 brokers; the cluster has 2"):
        replication_plan(specs, brokers=2, requested=3)
    with pytest.raises(TopicsError, match="at least 1"):
        replication_plan(specs, brokers=2, requested=0)
    # min.insync.replicas follows the factor actually used: at most factor - 1, at least 1.
    spec = specs[0]
    assert [spec.min_insync(rf) for rf in (1, 2, 3, 5)] == [1, 1, 2, 2]


async def _broker_count(kafka_settings: KafkaSettings) -> int:
    admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
    await admin.start()
    try:
        return len((await admin.describe_cluster())["brokers"])
    finally:
        await admin.close()


def _topics_command(kafka_bootstrap: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamer.cli", "topics", *args, "--prefix", prefix,
         "--bootstrap-servers", kafka_bootstrap],
        capture_output=True, text=True, timeout=60, cwd=ROOT)


async def test_replication_factor_beyond_the_cluster_is_an_error(
    kafka_bootstrap: str, kafka_settings: KafkaSettings
) -> None:
    prefix = f"r{uuid.uuid4().hex[:8]}"
    brokers = await _broker_count(kafka_settings)
    too_many = _topics_command(kafka_bootstrap, prefix, "apply",
                               "--replication-factor", str(brokers + 1))
    assert too_many.returncode == 2
    assert (f"--replication-factor {brokers + 1} needs at least {brokers + 1} brokers; "
            f"the cluster has {brokers}") in too_many.stderr
    assert sorted(await missing_topics(kafka_settings, worker_topics(prefix))) == sorted(
        worker_topics(prefix)), "nothing is created"

    fits = _topics_command(kafka_bootstrap, prefix, "apply", "--replication-factor",
                           str(brokers))
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.count("created") == len(EXPECTED) and "clamped" not in fits.stdout
    assert await missing_topics(kafka_settings, worker_topics(prefix)) == []


async def test_spec_factor_is_clamped_to_the_cluster(
    kafka_bootstrap: str, kafka_settings: KafkaSettings
) -> None:
    brokers = await _broker_count(kafka_settings)
    if brokers >= 3:
        pytest.skip(f"the cluster has {brokers} brokers: the specs' factor 3 fits")
    prefix = f"k{uuid.uuid4().hex[:8]}"
    applied = _topics_command(kafka_bootstrap, prefix, "apply")
    assert applied.returncode == 0, applied.stderr
    assert (f"clamped   replication factor {brokers} instead of the spec's 3 for "
            f"{len(EXPECTED)} topics: "
            f"the cluster has {brokers} broker") in applied.stdout
    admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
    await admin.start()
    try:
        (tokens,) = await admin.describe_topics([f"{prefix}.tokens"])
        assert {len(p["replicas"]) for p in tokens["partitions"]} == {brokers}
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, f"{prefix}.tokens")])
        configs = {e[0]: e[1] for e in response.resources[0][4]}
        assert configs["min.insync.replicas"] == "1"  # never above the factor used
    finally:
        await admin.close()
    assert "clamped" not in _topics_command(kafka_bootstrap, prefix, "apply").stdout


async def test_topics_check_reports_missing_and_creates_nothing(
    kafka_bootstrap: str, kafka_settings: KafkaSettings
) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}"
    missing = _topics_command(kafka_bootstrap, prefix, "check")
    assert missing.returncode == 1
    assert f"missing   {prefix}.tokens" in missing.stdout
    assert f"{prefix}.tokens" in await missing_topics(kafka_settings, [f"{prefix}.tokens"])
    await apply_topics(kafka_settings, prefix)
    present = _topics_command(kafka_bootstrap, prefix, "check")
    assert present.returncode == 0 and "missing" not in present.stdout


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
