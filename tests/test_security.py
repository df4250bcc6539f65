"""Security: TLS through the embedded broker's terminator (for real), SASL settings plumbing (unit),
and SASL against Apache Kafka in Docker when an engine answers (skipped otherwise).

Certificates are made here with trustme (a throwaway CA). Every broker, terminator and container
is stopped in a `finally`, pass or fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from conftest import _docker_engine_answers

from streamer.broker import EmbeddedBroker, free_port, port_open
from streamer.config import SASL_MECHANISMS, KafkaSettings
from streamer.tls_proxy import TlsTerminator

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55w0rd-never-logged"
FAIL_WITHIN_S = 20.0


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    """The CA that signed the server (and client) certificates."""
    other_ca: str
    """A CA that signed nothing here: trusting only it must fail."""
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    wrong_host_cert: str
    """Signed by `ca`, but for example.org only: fails hostname checks on 127.0.0.1."""
    wrong_host_key: str


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("streamer-client@example.org")
    wrong_host = ca.issue_cert("example.org")

    def write(name: str, blob: trustme.Blob) -> str:
        path = folder / name
        blob.write_to_path(str(path))
        return str(path)

    def write_chain(name: str, leaf: trustme.LeafCert) -> str:
        path = folder / name
        path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return str(path)

    return TlsFiles(
        ca=write("ca.pem", ca.cert_pem), other_ca=write("other-ca.pem", other.cert_pem),
        server_cert=write_chain("server.pem", server),
        server_key=write("server.key", server.private_key_pem),
        client_cert=write_chain("client.pem", client),
        client_key=write("client.key", client.private_key_pem),
        wrong_host_cert=write_chain("wrong-host.pem", wrong_host),
        wrong_host_key=write("wrong-host.key", wrong_host.private_key_pem),
    )


@pytest.fixture(scope="module")
def tls_broker(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("tls-broker") / "broker.log"
    broker = EmbeddedBroker(log_path=log, tls_cert=tls_files.server_cert,
                            tls_key=tls_files.server_key)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def ssl_settings(broker: EmbeddedBroker, cafile: str, **extra: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers, security_protocol="SSL",
                         ssl_cafile=cafile, **extra)


async def create_topic(kwargs: dict[str, object], topic: str, partitions: int = 2) -> None:
    admin = AIOKafkaAdminClient(**kwargs)  # type: ignore[arg-type]
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def bootstrap_fails(kwargs: dict[str, object]) -> BaseException:
    """Start a producer that must not get through; return what stopped it."""
    producer = AIOKafkaProducer(request_timeout_ms=5000, **kwargs)  # type: ignore[arg-type]
    try:
        with pytest.raises((KafkaError, OSError, asyncio.TimeoutError)) as info:
            await asyncio.wait_for(producer.start(), FAIL_WITHIN_S)
        return info.value
    finally:
        await producer.stop()


def start_process(args: list[str], log_path: Path, env: dict[str, str]
                  ) -> subprocess.Popen[bytes]:
    """`streamer ARGS` as a child process, output to log_path."""
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "streamer.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})


def stop_process(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- TLS through the terminator (real broker, real clients) ---------------------------------------


async def test_tls_produce_and_consume(tls_broker: EmbeddedBroker, tls_files: TlsFiles) -> None:
    # Settings as an operator gives them: environment variables.
    settings = KafkaSettings.from_env({
        "KAFKA_BOOTSTRAP_SERVERS": tls_broker.bootstrap_servers,
        "STREAMER_KAFKA_SECURITY_PROTOCOL": "SSL",
        "STREAMER_KAFKA_SSL_CAFILE": tls_files.ca,
    })
    kwargs = settings.client_kwargs()
    assert kwargs["security_protocol"] == "SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    await create_topic(kwargs, topic)

    producer = AIOKafkaProducer(**kwargs)
    await producer.start()
    try:
        # Metadata names only the TLS address: every connection after bootstrap is TLS too.
        ports = {b.port for b in producer.client.cluster.brokers()}
        assert ports == {tls_broker.tls_port}, ports
        for i in range(5):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"same-key")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, group_id=f"g-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", **kwargs)
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < 5 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += [m.value for records in batches.values() for m in records if m.value]
        await consumer.commit()
    finally:
        await consumer.stop()
    assert got == [f"m{i}".encode() for i in range(5)]
    assert tls_broker.terminator is not None and tls_broker.terminator.connections_total >= 3


async def test_tls_client_trusting_another_ca_fails(tls_broker: EmbeddedBroker,
                                                    tls_files: TlsFiles) -> None:
    error = await bootstrap_fails(ssl_settings(tls_broker, tls_files.other_ca).client_kwargs())
    assert "bootstrap" in str(error).lower() or isinstance(error, asyncio.TimeoutError)


async def test_tls_client_with_system_cas_only_fails(tls_broker: EmbeddedBroker) -> None:
    # No ssl_cafile: the default trust store, which does not hold the test CA.
    settings = KafkaSettings(bootstrap_servers=tls_broker.bootstrap_servers,
                             security_protocol="SSL")
    await bootstrap_fails(settings.client_kwargs())


async def test_plaintext_client_at_tls_port_is_refused(tls_broker: EmbeddedBroker) -> None:
    error = await bootstrap_fails({"bootstrap_servers": tls_broker.bootstrap_servers,
                                   "security_protocol": "PLAINTEXT"})
    assert "bootstrap" in str(error).lower() or isinstance(error, asyncio.TimeoutError)


async def test_plaintext_client_at_broker_port_cannot_produce(tls_broker: EmbeddedBroker,
                                                              tls_files: TlsFiles) -> None:
    """The broker's own plaintext listener answers metadata on loopback, but it advertises only the
    TLS port, so a plaintext client is sent there and fails: it cannot produce."""
    topic = f"pt-{uuid.uuid4().hex[:8]}"
    await create_topic(ssl_settings(tls_broker, tls_files.ca).client_kwargs(), topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=tls_broker.plaintext_address,
                                request_timeout_ms=3000)
    try:
        await producer.start()
        assert {b.port for b in producer.client.cluster.brokers()} == {tls_broker.tls_port}
        with pytest.raises((KafkaError, asyncio.TimeoutError)):
            await asyncio.wait_for(producer.send_and_wait(topic, b"sneaky"), FAIL_WITHIN_S)
    finally:
        await producer.stop()
    # And nothing reached the topic.
    consumer = AIOKafkaConsumer(**ssl_settings(tls_broker, tls_files.ca).client_kwargs())
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        end = await consumer.end_offsets([tp])
        assert end[tp] == 0
    finally:
        await consumer.stop()


async def test_certificate_for_another_host_fails(tls_broker: EmbeddedBroker,
                                                  tls_files: TlsFiles) -> None:
    """Hostname checking is on: a certificate from the right CA but for another name fails."""
    terminator = TlsTerminator(listen_port=free_port(), target_port=tls_broker.port,
                               certfile=tls_files.wrong_host_cert, keyfile=tls_files.wrong_host_key)
    terminator.start()
    try:
        settings = KafkaSettings(bootstrap_servers=terminator.address, security_protocol="SSL",
                                 ssl_cafile=tls_files.ca)
        await bootstrap_fails(settings.client_kwargs())
    finally:
        terminator.stop()
    assert not port_open("127.0.0.1", terminator.listen_port)


async def test_mutual_tls_client_certificate(tls_files: TlsFiles, tmp_path: Path) -> None:
    """With tls_client_ca the terminator demands a client certificate: ssl_certfile/ssl_keyfile
    (STREAMER_KAFKA_SSL_CERTFILE/KEYFILE) get through, a client without one does not."""
    broker = EmbeddedBroker(log_path=tmp_path / "mtls.log", tls_cert=tls_files.server_cert,
                            tls_key=tls_files.server_key, tls_client_ca=tls_files.ca)
    try:
        broker.start()
        with_cert = KafkaSettings.from_env({
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "STREAMER_KAFKA_SECURITY_PROTOCOL": "SSL",
            "STREAMER_KAFKA_SSL_CAFILE": tls_files.ca,
            "STREAMER_KAFKA_SSL_CERTFILE": tls_files.client_cert,
            "STREAMER_KAFKA_SSL_KEYFILE": tls_files.client_key,
        }).client_kwargs()
        topic = f"mtls-{uuid.uuid4().hex[:8]}"
        await create_topic(with_cert, topic, 1)
        producer = AIOKafkaProducer(**with_cert)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"hello", partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**with_cert)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            record = await asyncio.wait_for(consumer.getone(), 60)  # a hang guard
            assert record.value == b"hello"
        finally:
            await consumer.stop()

        await bootstrap_fails(ssl_settings(broker, tls_files.ca).client_kwargs())
    finally:
        broker.stop()


async def test_worker_and_client_over_tls(tls_broker: EmbeddedBroker, tls_files: TlsFiles,
                                          tiny_model: Path, tmp_path: Path) -> None:
    """The whole path over TLS: `topics apply`, a `streamer worker` process configured only by
    STREAMER_KAFKA_* variables, and the client library."""
    from streamer.client import StreamerClient
    from streamer.topics import apply_topics

    env = {"STREAMER_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMER_KAFKA_SSL_CAFILE": tls_files.ca}
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": tls_broker.bootstrap_servers,
                                       **env})
    prefix = f"s{uuid.uuid4().hex[:8]}"
    await apply_topics(settings, prefix)
    log_path = tmp_path / "worker.log"
    worker = start_process(
        ["worker", "--model", str(tiny_model), "--prefix", prefix, "--metrics-port", "0",
         "--worker-id", "tls-worker", "--bootstrap-servers", tls_broker.bootstrap_servers],
        log_path, {"STREAMER_LOG_LEVEL": "INFO", **env})
    try:
        deadline = time.monotonic() + 120
        while "partitions_assigned" not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.1)
        async with StreamerClient(settings, prefix) as client:
            handle = await client.submit("Hello over TLS", max_tokens=4, temperature=0)
            result = await handle.result(timeout=60)
        assert result.outcome.type.value == "completed", result.outcome
        assert len(result.token_ids) == 4
    finally:
        stop_process(worker)


def test_stop_closes_both_ports(tls_files: TlsFiles) -> None:
    broker = EmbeddedBroker(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key)
    try:
        broker.start()
        assert port_open("127.0.0.1", broker.port)
        assert broker.tls_port and port_open("127.0.0.1", broker.tls_port)
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.tls_port}"
        assert broker.failure() is None
    finally:
        broker.stop()
        broker.stop()  # idempotent
    deadline = time.monotonic() + 30  # a hang guard: ports close at once normally
    while time.monotonic() < deadline and (port_open("127.0.0.1", broker.port)
                                           or port_open("127.0.0.1", broker.tls_port)):
        time.sleep(0.05)
    assert not port_open("127.0.0.1", broker.port)
    assert not port_open("127.0.0.1", broker.tls_port)


def test_tls_arguments_are_checked(tls_files: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        EmbeddedBroker(tls_cert=tls_files.server_cert)
    with pytest.raises(ValueError, match="tls_port"):
        EmbeddedBroker(tls_port=free_port())
    port = free_port()
    with pytest.raises(ValueError, match="must differ"):
        EmbeddedBroker(port=port, tls_cert=tls_files.server_cert, tls_key=tls_files.server_key,
                       tls_port=port)
    # A key that does not match the certificate fails before any process starts.
    broker = EmbeddedBroker(tls_cert=tls_files.server_cert, tls_key=tls_files.client_key)
    try:
        with pytest.raises(ssl.SSLError):
            broker.start()
        assert broker.process is None
    finally:
        broker.stop()
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(OSError):
        EmbeddedBroker(tls_cert=missing, tls_key=missing).start()


def test_cli_broker_tls_ready_line_and_clean_stop(tls_files: TlsFiles) -> None:
    port, tls_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "broker", "--port", str(port),
         "--tls-cert", tls_files.server_cert, "--tls-key", tls_files.server_key,
         "--tls-port", str(tls_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert ready.startswith(f"broker ready on 127.0.0.1:{tls_port} (TLS"), ready
        assert f"127.0.0.1:{port}" not in ready  # the plaintext port is not offered to clients

        async def metadata_ports() -> set[int]:
            kwargs = KafkaSettings(bootstrap_servers=f"127.0.0.1:{tls_port}",
                                   security_protocol="SSL",
                                   ssl_cafile=tls_files.ca).client_kwargs()
            producer = AIOKafkaProducer(**kwargs)
            await producer.start()
            try:
                return {b.port for b in producer.client.cluster.brokers()}
            finally:
                await producer.stop()

        assert asyncio.run(metadata_ports()) == {tls_port}
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert "broker stopped" in out
        assert not port_open("127.0.0.1", tls_port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_broker_rejects_half_tls_flags(tls_files: TlsFiles) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "broker", "--port", str(free_port()),
         "--tls-cert", tls_files.server_cert],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert result.returncode == 2
    assert "--tls-key" in result.stderr


# -- SASL plumbing (no broker: this one cannot authenticate) -------------------------------------


def sasl_env(mechanism: str, cafile: str, **changes: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1.example.org:9094,kafka-2.example.org:9094",
        "STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMER_KAFKA_SASL_MECHANISM": mechanism,
        "STREAMER_KAFKA_SASL_USERNAME": "alice",
        "STREAMER_KAFKA_SASL_PASSWORD": SECRET,
        "STREAMER_KAFKA_SSL_CAFILE": cafile,
        **changes,
    }
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_settings_from_env_build_aiokafka_clients(mechanism: str,
                                                                 tls_files: TlsFiles) -> None:
    settings = KafkaSettings.from_env(sasl_env(mechanism, tls_files.ca))
    kwargs = settings.client_kwargs()
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": "kafka-1.example.org:9094,kafka-2.example.org:9094",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(cert.get("issuer") for cert in context.get_ca_certs())  # the CA file was loaded
    kwargs["ssl_context"] = context

    # Real aiokafka clients accept exactly these kwargs (construction only: nothing to connect to).
    producer = AIOKafkaProducer(**kwargs)
    consumer = AIOKafkaConsumer("llm.requests.normal", group_id="streamer-workers", **kwargs)
    admin = AIOKafkaAdminClient(**kwargs)
    await producer.stop()
    await consumer.stop()
    await admin.close()

    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_plaintext_has_no_tls(mechanism: str) -> None:
    settings = KafkaSettings.from_env({
        "STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAMER_KAFKA_SASL_MECHANISM": mechanism,
        "STREAMER_KAFKA_SASL_USERNAME": "alice",
        "STREAMER_KAFKA_SASL_PASSWORD": SECRET,
    })
    kwargs = settings.client_kwargs()
    assert "ssl_context" not in kwargs
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == mechanism
    producer = AIOKafkaProducer(**kwargs)
    await producer.stop()


def test_every_documented_mechanism_is_tested() -> None:
    assert set(SASL_MECHANISMS) == {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}


def test_missing_password_is_named_and_nothing_secret_leaks(tls_files: TlsFiles) -> None:
    with pytest.raises(ValueError) as info:
        KafkaSettings.from_env(sasl_env("PLAIN", tls_files.ca,
                                        STREAMER_KAFKA_SASL_PASSWORD=None))
    assert "sasl_password" in str(info.value)
    # A missing username with a password given: the error must not echo the password.
    with pytest.raises(ValueError) as info:
        KafkaSettings.from_env(sasl_env("SCRAM-SHA-256", tls_files.ca,
                                        STREAMER_KAFKA_SASL_USERNAME=None))
    assert "sasl_username" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


@pytest.mark.parametrize("bad", ["SCRAM-SHA-1", "GSSAPI", "scram-sha-256", ""])
def test_unknown_mechanism_is_named_and_password_not(bad: str, tls_files: TlsFiles) -> None:
    with pytest.raises(ValueError) as info:
        KafkaSettings.from_env(sasl_env(bad, tls_files.ca))
    message = str(info.value)
    assert f"sasl_mechanism={bad!r}" in message
    assert "SCRAM-SHA-512" in message  # says what is accepted
    assert SECRET not in message and SECRET not in repr(info.value)


def test_missing_mechanism_is_named(tls_files: TlsFiles) -> None:
    with pytest.raises(ValueError, match="sasl_mechanism=None"):
        KafkaSettings.from_env(sasl_env("PLAIN", tls_files.ca,
                                        STREAMER_KAFKA_SASL_MECHANISM=None))


def test_unknown_security_protocol_is_named() -> None:
    with pytest.raises(ValueError, match="'SASL_TLS'"):
        KafkaSettings.from_env({"STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_TLS",
                                "STREAMER_KAFKA_SASL_PASSWORD": SECRET})


def test_password_not_in_repr_of_any_settings_holder() -> None:
    from streamer.config import EngineConfig, WorkerConfig

    kafka = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                          sasl_username="alice", sasl_password=SECRET)
    worker = WorkerConfig(engine=EngineConfig(model="m"), kafka=kafka)
    assert SECRET not in repr(kafka)
    assert SECRET not in repr(worker)
    assert "alice" in repr(kafka)  # the username is not secret and helps debugging


# -- SASL against real Kafka (Docker) --------------------------------------------------------------


def _sasl_kafka_skip_reason() -> str | None:
    if not _docker_engine_answers():
        return ("no Docker engine answers `docker info` here: SASL against real Kafka NOT "
                "verified (only the settings plumbing above is)")
    if importlib.util.find_spec("testcontainers") is None:
        return "testcontainers is not installed: SASL against real Kafka NOT verified"
    return None


SKIP_SASL_KAFKA = _sasl_kafka_skip_reason()


@pytest.mark.kafka
@pytest.mark.skipif(SKIP_SASL_KAFKA is not None, reason=SKIP_SASL_KAFKA or "")
async def test_sasl_plain_against_kafka_in_docker() -> None:
    from testcontainers.core.container import DockerContainer  # type: ignore[import-not-found]

    host_port = free_port()
    # Listener names without '_' or '-' so the env -> property mapping is unambiguous.
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required '
            'username="admin" password="admin-secret" '
            f'user_admin="admin-secret" user_alice="{SECRET}";')
    env = {
        "CLUSTER_ID": "4L6g3nShT-eMCtK--X86sw",
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "SASL://0.0.0.0:9092,INTERNAL://0.0.0.0:29092,CONTROLLER://0.0.0.0:29093",
        "KAFKA_ADVERTISED_LISTENERS": f"SASL://127.0.0.1:{host_port},INTERNAL://localhost:29092",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP":
            "SASL:SASL_PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "INTERNAL",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:29093",
        "KAFKA_SASL_ENABLED_MECHANISMS": "PLAIN",
        "KAFKA_LISTENER_NAME_SASL_PLAIN_SASL_JAAS_CONFIG": jaas,
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",
    }
    container = DockerContainer("apache/kafka:3.9.0").with_bind_ports(9092, host_port)
    for key, value in env.items():
        container = container.with_env(key, value)

    def settings(password: str) -> KafkaSettings:
        return KafkaSettings.from_env({
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{host_port}",
            "STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "STREAMER_KAFKA_SASL_MECHANISM": "PLAIN",
            "STREAMER_KAFKA_SASL_USERNAME": "alice",
            "STREAMER_KAFKA_SASL_PASSWORD": password,
        })

    container.start()
    try:
        good = settings(SECRET).client_kwargs()
        topic = f"sasl-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + 120
        while True:  # Kafka takes a while to accept connections
            try:
                await create_topic(good, topic, 1)
                break
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        producer = AIOKafkaProducer(**good)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"authenticated", partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**good)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            record = await asyncio.wait_for(consumer.getone(), 30)
            assert record.value == b"authenticated"
        finally:
            await consumer.stop()
        await bootstrap_fails(settings("wrong-password").client_kwargs())
    finally:
        container.stop()
