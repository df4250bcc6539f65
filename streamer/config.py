"""Settings: command-line flags, then STREAMER_* environment variables, then defaults.

The environment is read once, here (`from_env`). Every settings class is a frozen dataclass with a
docstring per field and a `validate()` that names the offending values.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from streamer.protocol import PRIORITIES
from streamer.validation import RequestLimits

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSettings:
    """How every client (worker, submit, bench, topics) reaches the cluster."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    """Comma-separated host:port list (env KAFKA_BOOTSTRAP_SERVERS)."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used."""
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    """Never logged: excluded from repr."""
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def validate(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must not be empty")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(
                f"security_protocol={self.security_protocol!r}; "
                f"expected one of {SECURITY_PROTOCOLS}"
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(
                    f"sasl_mechanism={self.sasl_mechanism!r}; expected one of {SASL_MECHANISMS}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("SASL needs sasl_username and sasl_password")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if "SSL" in self.security_protocol:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            kwargs["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> KafkaSettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "bootstrap_servers": env.get("KAFKA_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP),
            "security_protocol": env.get("STREAMER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
            "sasl_mechanism": env.get("STREAMER_KAFKA_SASL_MECHANISM"),
            "sasl_username": env.get("STREAMER_KAFKA_SASL_USERNAME"),
            "sasl_password": env.get("STREAMER_KAFKA_SASL_PASSWORD"),
            "ssl_cafile": env.get("STREAMER_KAFKA_SSL_CAFILE"),
            "ssl_certfile": env.get("STREAMER_KAFKA_SSL_CERTFILE"),
            "ssl_keyfile": env.get("STREAMER_KAFKA_SSL_KEYFILE"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings


@dataclass(frozen=True)
class EngineConfig:
    """The generation engine: model, devices and the scheduler's limits."""

    model: str = ""
    """Hugging Face model folder or hub id."""
    devices: tuple[str, ...] = ("cpu",)
    """One pipeline stage per entry, e.g. ("cpu",), ("cpu", "cpu"), ("cuda:0", "cuda:1")."""
    layer_split: tuple[int, ...] | None = None
    """Layers per stage; None splits evenly."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA when supported)."""
    max_num_seqs: int = 32
    """Most sequences in one engine step (across all micro-batches)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: prefill chunks plus one token per decoding sequence."""
    kv_cache_bytes: int | None = None
    """KV-cache budget in bytes; None: kv_cache_fraction of GPU memory, or 1 GiB on CPU."""
    kv_cache_fraction: float = 0.5
    """Fraction of free device memory for the KV cache when kv_cache_bytes is None (CUDA)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + completion); None uses the model's context length."""
    default_max_tokens: int = 128
    """max_tokens when a request omits it (further capped by the room left in the context)."""
    max_tokens_cap: int | None = None
    """Largest max_tokens a request may ask for; None: the model's context length."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None: max_model_len - 1."""
    torch_threads: int | None = None
    """Intra-op threads for torch on CPU; None keeps torch's default. 1 is best when several
    workers share a few cores (OpenMP threads spinning against each other slow everything)."""
    aging_s: float = 30.0
    """Seconds of waiting that lift a request one lane (against starvation); 0 disables aging."""
    preemption: bool = True
    """Preempt lower-lane running sequences when a higher-lane request finds no slot."""
    test_gate: str | None = None
    """Test-only (STREAMER_TEST_GATE): path of a gate file that holds engine steps while it
    exists (see docs/testing.md). Production never sets it."""

    def validate(self) -> None:
        errors = []
        if not self.model:
            errors.append("model is required (a Hugging Face folder or id)")
        if not self.devices:
            errors.append("devices must name at least one device")
        if self.layer_split is not None and len(self.layer_split) != len(self.devices):
            errors.append(
                f"layer_split={self.layer_split} needs one entry per device {self.devices}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            errors.append(f"dtype={self.dtype!r}; expected auto, float32, bfloat16 or float16")
        errors += [
            f"{name}={getattr(self, name)} must be >= 1"
            for name in ("max_num_seqs", "max_num_batched_tokens", "default_max_tokens")
            if getattr(self, name) < 1
        ]
        if not 0 < self.kv_cache_fraction <= 1:
            errors.append(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1]")
        if errors:
            raise ValueError("; ".join(errors))


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: where it reads, what it serves, how it reports."""

    engine: EngineConfig
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    prefix: str = "llm"
    """Topic prefix; one cluster can host several fleets."""
    group_id: str | None = None
    """Consumer group; None: `streamer-workers` (`<prefix>-streamer-workers` for other prefixes)."""
    worker_id: str = ""
    """Name on events and logs; empty: a random one."""
    group_instance_id: str | None = None
    """Static membership id for rolling restarts."""
    metrics_port: int = 9400
    """Prometheus /metrics, /healthz, /readyz; 0 picks a free port."""
    lane_capacity: int = 64
    """Waiting requests held per priority lane before its partitions are paused."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    cancel_window_s: float = 600.0
    """How long cancels are remembered (and replayed on start)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight work may finish before it is handed back uncommitted."""
    max_outstanding_outputs: int = 20_000
    """Unacknowledged output messages at which intake pauses (resumes below half)."""
    revoke_wait_s: float = 10.0
    """On a revoke, how long requests of revoked partitions may take to stop before they are
    handed back uncommitted."""
    shutdown_timeout_s: float = 10.0
    """Bound on the final flush, commit and group leave after the grace period, so a worker
    exits even when the broker is gone."""
    stall_timeout_s: float = 60.0
    """Work queued but no engine step finished for this long: /healthz fails, stages are logged."""
    log_prompts: bool = False
    """Log prompt text (debugging only; prompts are never logged otherwise)."""
    apply_topics: bool = True
    """Create missing topics at start (the embedded broker loses them on restart)."""

    @property
    def consumer_group(self) -> str:
        if self.group_id:
            return self.group_id
        return "streamer-workers" if self.prefix == "llm" else f"{self.prefix}-streamer-workers"

    @property
    def name(self) -> str:
        return self.worker_id or f"worker-{uuid.uuid4().hex[:8]}"

    def validate(self) -> None:
        self.engine.validate()
        self.kafka.validate()
        self.limits.validate()
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"prefix={self.prefix!r} must be a non-empty topic-name prefix")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port={self.metrics_port} is not a port")
        if self.lane_capacity < 1:
            raise ValueError(f"lane_capacity={self.lane_capacity} must be >= 1")


T = TypeVar("T")


def env_overrides(
    cls: type[T], env: Mapping[str, str] | None = None, prefix: str = "STREAMER_"
) -> dict[str, Any]:
    """Read `STREAMER_<FIELD>` for each simple field of a settings dataclass, typed by it."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = env.get(prefix + f.name.upper())
        if raw is None:
            continue
        values[f.name] = parse_value(f.name, raw, f.type)
    return values


def parse_value(name: str, raw: str, annotation: Any) -> Any:
    text = str(annotation)
    try:
        if "tuple" in text:
            items = [x.strip() for x in raw.split(",") if x.strip()]
            return tuple(int(x) for x in items) if "int" in text else tuple(items)
        if text.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"cannot read {name}={raw!r} as {text}") from None
    return raw


PRIORITY_LANES = PRIORITIES
