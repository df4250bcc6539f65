"""Settings: one flag and one environment variable per field, generated; precedence; errors; docs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import subprocess
import sys
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from streamer import cli, fleet
from streamer.config import CacheConfig, EngineConfig, KafkaSettings, WorkerConfig, consumer_group
from streamer.observability import http
from streamer.observability.http import MetricsPortInUse, MetricsServer, port_in_use
from streamer.settings import (
    SECTIONS,
    Setting,
    field_docs,
    load_worker_config,
    resolve_settings,
    settings,
    settings_markdown,
)
from streamer.validation import RequestLimits

ENV_ONLY = {"sasl_password"}  # a flag would put the password in `ps`


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def load(*argv: str, env: dict[str, str] | None = None) -> WorkerConfig:
    args = parse("worker", *argv)
    return load_worker_config(cli.setting_flags(args), env or {})


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something already listens on (as a second worker would find it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _sample(setting: Setting) -> tuple[str, object]:
    """A text value for each kind, and the typed value it must become."""
    if setting.kind is tuple:
        return ("7,8", (7, 8)) if setting.item is int else ("a,b", ("a", "b"))
    return {int: ("7", 7), float: ("7.5", 7.5), str: ("seven", "seven")}[setting.kind]


# ------------------------------------------------------------------ every field, generated


def test_every_field_has_a_setting_with_flag_env_and_help() -> None:
    by_name = {s.name: s for s in settings()}
    sections = {section.cls for section in SECTIONS}
    assert sections == {WorkerConfig, EngineConfig, RequestLimits, KafkaSettings, CacheConfig}
    nested = {section.attr for section in SECTIONS if section.attr}
    assert nested == {"engine", "kafka", "limits", "cache"}
    for cls in sections:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if cls is WorkerConfig and f.name in nested:
                continue  # a section of its own
            setting = by_name[f.name]
            assert setting.help == docs[f.name]
            if cls is KafkaSettings:
                assert setting.env.startswith(("STREAMER_KAFKA_", "KAFKA_"))
            elif cls is CacheConfig:  # STREAMER_CACHE and STREAMER_REDIS_URL are named apart
                assert setting.env in ("STREAMER_CACHE", "STREAMER_REDIS_URL",
                                       f"STREAMER_CACHE_{f.name.upper()}")
            else:
                assert setting.env == f"STREAMER_{f.name.upper()}"
            if f.name in ENV_ONLY:
                assert setting.flag is None
            else:
                assert setting.flag, f"{f.name} has no flag"


@pytest.mark.parametrize("setting", [s for s in settings() if s.flag], ids=lambda s: s.name)
def test_each_flag_and_each_variable_reaches_its_field(setting: Setting) -> None:
    assert setting.flag is not None
    expected: object
    if setting.kind is bool:
        flag_args, env_text, expected = [f"--no-{setting.flag[2:]}"], "0", False
    else:
        env_text, expected = _sample(setting)
        flag_args = [setting.flag, env_text]
    given = resolve_settings(cli.setting_flags(parse("worker", *flag_args)), {})
    assert given == {setting.name: (expected, setting.flag)}
    assert resolve_settings({}, {setting.env: env_text}) == {setting.name: (expected, setting.env)}


def test_names_are_unique_and_aliases_kept() -> None:
    flags = [f for s in settings() for f in (s.flag, *s.aliases) if f]
    assert len(flags) == len(set(flags))
    assert load("--model", "m", "--group", "g").group_id == "g"
    assert load("--model", "m", "--bootstrap-servers", "k:1").kafka.bootstrap_servers == "k:1"


# ----------------------------------------------------------------------------- precedence


def test_flag_beats_env_beats_default() -> None:
    env = {"STREAMER_MODEL": "from-env", "STREAMER_MAX_NUM_SEQS": "5",
           "STREAMER_SHUTDOWN_GRACE_S": "2.5", "STREAMER_MAX_MESSAGES": "9",
           "KAFKA_BOOTSTRAP_SERVERS": "env:9092"}
    config = load("--max-num-seqs", "7", "--max-messages", "11", env=env)
    assert config.engine.model == "from-env"  # env over default
    assert config.engine.max_num_seqs == 7  # flag over env
    assert config.shutdown_grace_s == 2.5
    assert config.limits.max_messages == 11
    assert config.kafka.bootstrap_servers == "env:9092"
    assert config.engine.max_num_batched_tokens == 512  # default
    assert config.revoke_wait_s == 10.0 and config.shutdown_timeout_s == 10.0


def test_worker_config_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_MODEL", "m")
    monkeypatch.setenv("STREAMER_REVOKE_WAIT_S", "3")
    config = cli.worker_config(parse("worker", "--shutdown-timeout-s", "4"))
    assert (config.engine.model, config.revoke_wait_s, config.shutdown_timeout_s) == ("m", 3, 4)


def test_bool_tuple_and_optional_parsing() -> None:
    env = {"STREAMER_PREEMPTION": "off", "STREAMER_LOG_PROMPTS": "yes",
           "STREAMER_KV_CACHE_BYTES": "1024", "STREAMER_DEVICES": " cpu , cpu "}
    config = load("--model", "m", env=env)
    assert config.engine.preemption is False and config.log_prompts is True
    assert config.engine.devices == ("cpu", "cpu")
    assert config.engine.kv_cache_bytes == 1024
    config = load("--model", "m", "--preemption", "--no-log-prompts", "--kv-cache-bytes", "none",
                  "--layer-split", "3,5", "--devices", "cpu,cpu", env=env)
    assert config.engine.preemption is True and config.log_prompts is False
    assert config.engine.kv_cache_bytes is None  # a flag can unset what the environment set
    assert config.engine.layer_split == (3, 5)
    assert load("--model", "m").metrics_port is None
    assert load("--model", "m", "--metrics-port", "0").metrics_port == 0
    assert load("--model", "m", env={"STREAMER_TEST_GATE": "/tmp/g"}).engine.test_gate == "/tmp/g"


def test_kafka_flags_for_other_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env:9093")
    args = parse("topics", "list", "--kafka-ssl-cafile", "/ca.pem")
    kafka = cli._kafka(args)
    assert (kafka.bootstrap_servers, kafka.security_protocol, kafka.ssl_cafile) == (
        "env:9093", "SSL", "/ca.pem")
    # The variables keep their names; an empty mechanism stays '' (and is named as such).
    with pytest.raises(ValueError, match="sasl_mechanism=''"):
        KafkaSettings.from_env({"STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                "STREAMER_KAFKA_SASL_MECHANISM": ""})


# --------------------------------------------------------------------------------- errors


def test_unreadable_values_are_all_named() -> None:
    with pytest.raises(ValueError) as info:
        load("--model", "m", "--max-num-seqs", "many", "--layer-split", "1,x",
             env={"STREAMER_PREEMPTION": "maybe", "STREAMER_AGING_S": "soon"})
    message = str(info.value)
    for part in ("--max-num-seqs='many': expected an integer", "--layer-split='1,x'",
                 "STREAMER_PREEMPTION='maybe': expected true or false",
                 "STREAMER_AGING_S='soon': expected a number"):
        assert part in message


def test_invalid_values_are_named_by_validate() -> None:
    with pytest.raises(ValueError) as info:
        load(env={"STREAMER_SHUTDOWN_TIMEOUT_S": "0", "STREAMER_REVOKE_WAIT_S": "-1",
                  "STREAMER_MAX_STOP_STRINGS": "0", "STREAMER_METRICS_PORT": "70000",
                  "STREAMER_KV_CACHE_FRACTION": "2"})
    message = str(info.value)
    for part in ("model is required", "shutdown_timeout_s=0.0 must be > 0",
                 "revoke_wait_s=-1.0 must be >= 0", "max_stop_strings", "metrics_port=70000",
                 "kv_cache_fraction=2.0"):
        assert part in message


def test_worker_with_invalid_value_prints_one_line_and_exits_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worker", "--model", "m", "--max-num-seqs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamer worker: invalid configuration: max_num_seqs=0 must be >= 1")
    assert err.count("\n") == 1


def test_worker_process_error_has_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "worker", "--model", "m", "--devices", "cpu",
         "--layer-split", "two"], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "streamer worker: invalid configuration: --layer-split='two': expected an integer")


# ------------------------------------------------------------------------------- fleet


def test_fleet_passes_every_worker_flag_given_through() -> None:
    args = parse("fleet", "--workers", "3", "--model", "m", "--max-num-seqs", "4",
                 "--no-preemption", "--devices", "cpu,cpu", "--metrics-port", "9500",
                 "--group", "g", "--max-messages", "8", "--bootstrap-servers", "k:1",
                 "--log-level", "DEBUG")
    argv = cli.fleet_worker_args(args)
    assert argv == ["--model=m", "--devices=cpu,cpu", "--max-num-seqs=4", "--no-preemption",
                    "--group-id=g", "--max-messages=8", "--bootstrap-servers=k:1",
                    "--log-level=DEBUG"]
    # A worker given those arguments (and its own port) has the fleet's configuration.
    worker = cli.worker_config(parse("worker", *argv, "--metrics-port", "9501"))
    assert worker == dataclasses.replace(cli.worker_config(args), metrics_port=9501)


def test_fleet_command_hands_args_and_base_port_to_run_fleet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    async def fake_run_fleet(worker_args: list[str], workers: int, base: int | None) -> int:
        calls.append((worker_args, workers, base))
        return 0

    monkeypatch.setattr(fleet, "run_fleet", fake_run_fleet)
    monkeypatch.delenv("STREAMER_METRICS_PORT", raising=False)
    assert cli.main(["fleet", "--model", "m", "--workers", "2", "--torch-threads", "1"]) == 0
    assert cli.main(["fleet", "--model", "m", "--metrics-port", "0"]) == 0
    assert calls == [(["--model=m", "--torch-threads=1"], 2, None), (["--model=m"], 2, 0)]


def test_fleet_without_model_says_what_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("STREAMER_MODEL", raising=False)
    assert cli.main(["fleet", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "streamer fleet: invalid configuration: model is required " \
                  "(a Hugging Face folder or id)\n"


def test_fleet_refuses_per_worker_ids() -> None:
    with pytest.raises(SystemExit) as info:
        parse("fleet", "--model", "m", "--worker-id", "w")
    assert info.value.code == 2


def test_fleet_with_a_taken_base_port_says_so(
        listening: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fleet", "--model", "m", "--workers", "1",
                     "--metrics-port", str(listening)]) == 2
    assert f"metrics ports [{listening}] are already in use" in capsys.readouterr().err


def test_fleet_worker_ports(monkeypatch: pytest.MonkeyPatch, listening: int) -> None:
    assert fleet.worker_metrics_port(9500, 2) == 9502
    assert fleet.worker_metrics_port(0, 2) not in (0, 2)
    monkeypatch.setattr(fleet, "DEFAULT_METRICS_PORT", listening)
    assert fleet.worker_metrics_port(None, 0) != listening  # taken: a free one instead
    assert port_in_use(listening) and not port_in_use(fleet.worker_metrics_port(None, 0))


# ---------------------------------------------------------------------------- metrics port


async def _get(port: int) -> int:
    def fetch() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return int(r.status)
    return await asyncio.to_thread(fetch)


async def test_default_metrics_port_taken_falls_back_to_a_free_one(
        monkeypatch: pytest.MonkeyPatch, listening: int) -> None:
    monkeypatch.setattr(http, "DEFAULT_METRICS_PORT", listening)
    server = MetricsServer(lambda: b"", host="127.0.0.1")
    async with server:
        assert server.port not in (listening, 0)
        assert await _get(server.port) == 200


async def test_explicit_metrics_port_taken_is_a_clear_error(listening: int) -> None:
    server = MetricsServer(lambda: b"", host="127.0.0.1", port=listening)
    with pytest.raises(MetricsPortInUse) as info:
        await server.start()
    assert str(info.value).startswith(f"metrics port {listening} on 127.0.0.1 is already in use")
    assert isinstance(info.value, OSError) and not server.started
    async with MetricsServer(lambda: b"", host="127.0.0.1", port=0) as free:
        assert free.port not in (listening, 0)


@pytest.mark.parametrize("wrapped", [False, True])
def test_worker_with_a_taken_port_prints_one_line_and_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], wrapped: bool,
        listening: int) -> None:
    class FakeWorker:
        def __init__(self, config: WorkerConfig) -> None:
            self.config = config

        def request_stop(self) -> None:
            pass

        async def run(self) -> None:
            error = MetricsPortInUse("0.0.0.0", self.config.metrics_port or 0)
            raise ExceptionGroup("worker", [error]) if wrapped else error

    monkeypatch.setitem(sys.modules, "streamer.worker", types.SimpleNamespace(Worker=FakeWorker))
    assert cli.main(["worker", "--model", "m", "--metrics-port", str(listening)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamer worker: metrics port {listening} on 0.0.0.0 is already")
    assert err.count("\n") == 1


# ------------------------------------------------------------------- group naming and docs


def test_one_rule_for_the_consumer_group() -> None:
    assert consumer_group("llm") == "streamer-workers"
    assert consumer_group("demo") == "demo-streamer-workers"
    assert consumer_group("demo", "mine") == "mine"
    for prefix, group in (("llm", None), ("demo", None), ("demo", "mine")):
        config = WorkerConfig(engine=EngineConfig(model="m"), prefix=prefix, group_id=group)
        assert config.consumer_group == consumer_group(prefix, group)


def test_configuration_doc_is_generated_from_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(ROOT) / "docs" / "configuration.md").read_text()
    assert doc == settings_markdown(), "run: streamer config --markdown > docs/configuration.md"
    assert cli.main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == doc
    for s in settings():
        assert f"`{s.env}`" in doc


def test_config_command_shows_values_and_sources(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMER_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("STREAMER_KAFKA_SASL_PASSWORD", "hunter2")
    assert cli.main(["config", "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert lines["STREAMER_MODEL"] == ["'m'", "--model"]
    assert lines["STREAMER_MAX_NUM_SEQS"] == ["5", "environment"]
    assert lines["STREAMER_KAFKA_SASL_PASSWORD"] == ["***", "environment"]
    assert lines["STREAMER_DTYPE"] == ["'auto'", "default"]
