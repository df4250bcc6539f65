"""Settings: command-line flags, then environment variables, then defaults.

Every settings class is a frozen dataclass with a docstring per field and a `validate()` that
names the offending values. Those docstrings are the only description of a setting:
streamer/settings.py turns each field into a flag and an environment variable, reads the
environment (once, for everything) and writes docs/configuration.md from them.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from streamer.validation import RequestLimits

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
DEFAULT_GROUP = "streamer-workers"


def consumer_group(prefix: str, group_id: str | None = None) -> str:
    """The workers' consumer group: `group_id` when given, else `streamer-workers` for the
    default prefix `llm` and `<prefix>-streamer-workers` for any other, so that fleets sharing a
    cluster under different prefixes never share a group."""
    if group_id:
        return group_id
    return DEFAULT_GROUP if prefix == "llm" else f"{prefix}-{DEFAULT_GROUP}"


@dataclass(frozen=True)
class KafkaSettings:
    """How every client (worker, submit, bench, topics) reaches the cluster."""

    bootstrap_servers: str = field(
        default=DEFAULT_BOOTSTRAP,
        metadata={"env": "KAFKA_BOOTSTRAP_SERVERS", "flag": "--bootstrap-servers"},
    )
    """Comma-separated host:port list of Kafka brokers."""
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: str | None = field(default=None, repr=False, metadata={"flag": None})
    """SASL password. Environment only (a flag would show in `ps`); never logged."""
    ssl_cafile: str | None = None
    """PEM file of the CA that signed the brokers' certificates; none: the system's CAs."""
    ssl_certfile: str | None = None
    """PEM client certificate, for brokers that authenticate clients by certificate (mTLS)."""
    ssl_keyfile: str | None = None
    """PEM private key of ssl_certfile."""

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
        """KAFKA_BOOTSTRAP_SERVERS and STREAMER_KAFKA_*; overrides that are not None win."""
        from streamer.settings import resolve_settings

        given = resolve_settings(overrides, env, section="kafka")
        settings = cls(**{name: value for name, (value, _) in given.items()})
        settings.validate()
        return settings


@dataclass(frozen=True)
class EngineConfig:
    """The generation engine: model, devices and the scheduler's limits."""

    model: str = ""
    """Hugging Face model folder or hub id, or a `.gguf` file (required)."""
    devices: tuple[str, ...] = ("cpu",)
    """One pipeline stage per entry, e.g. cpu | cpu,cpu | cuda:0,cuda:1."""
    layer_split: tuple[int, ...] | None = None
    """Layers per stage, e.g. 3,5; none splits evenly."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA when supported)."""
    max_num_seqs: int = 64
    """Most sequences in one engine step (across all micro-batches). 64 measured faster than 32
    on CPU (docs/benchmarks.md); each step, so each token, takes longer the more it holds."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: prefill chunks plus one token per decoding sequence."""
    kv_cache_bytes: int | None = None
    """KV-cache budget in bytes (all stages together), cut into blocks; none: kv_cache_fraction
    of free GPU memory after the weights load, or 1 GiB on CPU."""
    kv_cache_fraction: float = 0.5
    """Fraction of free device memory for the KV cache when kv_cache_bytes is none (CUDA)."""
    block_size: int = 16
    """Tokens per KV-cache block: sequences take blocks as they grow, and full blocks of a shared
    prompt prefix are reused (prefix caching)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + completion), a limit and not a reservation; none uses the
    model's context length."""
    default_max_tokens: int = 128
    """max_tokens when a request omits it (further capped by the room left in the context)."""
    max_tokens_cap: int | None = None
    """Largest max_tokens a request may ask for; none: the model's context length."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; none: max_model_len - 1."""
    torch_threads: int | None = None
    """Intra-op threads for torch on CPU; none keeps torch's default. 1 is best when several
    workers share a few cores (OpenMP threads spinning against each other slow everything)."""
    aging_s: float = 30.0
    """Seconds of waiting that lift a request one lane (against starvation); 0 disables aging."""
    preemption: bool = True
    """Preempt lower-lane running sequences when a higher-lane request finds no slot."""
    test_gate: str | None = None
    """Test-only: path of a gate file that holds engine steps while it exists (see
    docs/testing.md). Production never sets it."""
    warmup: bool = True
    """Before the worker turns ready, run prefill and decode steps at the sizes it will use
    (one-time allocations and kernel selection), so the first request is as fast as the tenth.
    Nothing it computes stays reachable: no prefix-cache entry, no output (docs/operations.md)."""
    model_process: bool | None = None
    """Run the model (weights, KV pools, stages) in a child process of its own, so its forward
    never waits for the Python of Kafka I/O on the same interpreter lock; none: on in `streamer
    worker`, off for an engine used in-process (docs/architecture.md, "The model process")."""
    compile: bool = False
    """torch.compile each stage's decoder layers (measured in docs/benchmarks.md: on CPU it does
    not pay, so it is off). If compiling fails the worker logs it and runs uncompiled."""

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
        if self.layer_split is not None and min(self.layer_split, default=1) < 1:
            errors.append(f"layer_split={self.layer_split} needs at least one layer per stage")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            errors.append(f"dtype={self.dtype!r}; expected auto, float32, bfloat16 or float16")
        errors += _below(self, 1, "max_num_seqs", "max_num_batched_tokens", "default_max_tokens",
                         "kv_cache_bytes", "block_size", "max_model_len", "max_tokens_cap",
                         "max_prompt_tokens", "torch_threads")
        errors += _below(self, 0, "aging_s")
        if not 0 < self.kv_cache_fraction <= 1:
            errors.append(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1]")
        if errors:
            raise ValueError("; ".join(errors))


@dataclass(frozen=True)
class CacheConfig:
    """Result cache for deterministic requests (greedy, or sampled with a seed): a repeated
    request is answered from L1 (memory), L2 (Redis) or L3 (disk) without the engine
    (docs/cache.md)."""

    enabled: bool = field(default=False, metadata={"flag": "--cache", "env": "STREAMER_CACHE"})
    """Serve repeated deterministic requests from the cache, and fill it on every miss."""
    l1_bytes: int = 64 << 20
    """L1, in this process: least recently used entries are evicted past this many bytes."""
    redis_url: str | None = field(default=None, repr=False,
                                  metadata={"env": "STREAMER_REDIS_URL", "flag": "--redis-url"})
    """L2: a Redis server shared by the fleet, e.g. redis://cache:6379/0; none: no L2. May hold
    a password, so it is never printed."""
    l2_ttl_s: float = 86_400.0
    """L2 entries expire this long after they were written (Redis evicts by its own maxmemory
    policy before that)."""
    redis_timeout_s: float = 0.25
    """Bound on each Redis call: past it the call counts as an error and the lookup as a miss."""
    l3_path: str | None = None
    """L3: a directory for the on-disk cache (SQLite, shareable by the workers of one host);
    none: no L3."""
    l3_bytes: int = 1 << 30
    """L3 size bound: least recently used entries are evicted past it."""
    l3_ttl_s: float = 604_800.0
    """L3 entries expire this long after they were written."""

    def validate(self) -> None:
        errors = _below(self, 0, "l1_bytes", "l3_bytes")
        errors += [f"{name}={getattr(self, name)} must be > 0"
                   for name in ("l2_ttl_s", "redis_timeout_s", "l3_ttl_s")
                   if getattr(self, name) <= 0]
        if self.redis_url is not None and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            errors.append("redis_url must start with redis://, rediss:// or unix://")
        if errors:
            raise ValueError("; ".join(errors))


ASSIGNORS = ("sticky", "aiokafka-sticky", "roundrobin", "range")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: where it reads, what it serves, how it reports."""

    engine: EngineConfig
    """The generation engine's settings."""
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    """How the worker reaches the cluster."""
    prefix: str = "llm"
    """Topic prefix; one cluster can host several fleets."""
    group_id: str | None = field(default=None, metadata={"aliases": ("--group",)})
    """Consumer group; none: `streamer-workers` (`<prefix>-streamer-workers` for other
    prefixes)."""
    worker_id: str = ""
    """Name on events and logs; empty: a random one."""
    group_instance_id: str | None = None
    """Static membership (Kafka's group.instance.id): a stable id per worker, e.g. a
    StatefulSet pod name, so a worker restarted within the session timeout gets its partitions
    back without a rebalance; none: dynamic membership."""
    assignor: str = "sticky"
    """Partition assignor of the consumer group: sticky (each lane's partitions split evenly,
    and members keep the ones they own when others join or leave; aiokafka's sticky and
    round-robin are offered too, so a group that still has older workers agrees on one),
    aiokafka-sticky (balances the count over all lanes together: a lane can land on one worker),
    roundrobin or range."""
    metrics_port: int | None = None
    """Port of Prometheus /metrics, /healthz and /readyz. none: 9400, or a free port (logged as
    metrics_listening) when 9400 is taken; a port given is used exactly (an error when taken);
    0 picks a free port."""
    lane_capacity: int = 64
    """Waiting requests held per priority lane before its partitions are paused."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Limits applied to every request record before tokenizing."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The result cache (off by default)."""
    cancel_window_s: float = 600.0
    """How long cancels are remembered (and replayed on start)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight work may finish before it is handed back uncommitted."""
    revoke_wait_s: float = 10.0
    """On a revoke, how long requests of revoked partitions may take to stop before they are
    handed back uncommitted."""
    shutdown_timeout_s: float = 10.0
    """Bound on the final flush, commit and group leave after the grace period, so a worker exits
    even when the broker is gone."""
    max_outstanding_outputs: int = 20_000
    """Unacknowledged output messages at which intake pauses (resumes below half)."""
    fetch_max_wait_ms: int = 20
    """How long the broker may hold an empty fetch of request records: the idle time to first
    token includes up to this (Kafka's default 500 ms would add half a second)."""
    max_poll_records: int = 64
    """Request records taken per fetch; the lane bound is lane_capacity plus one fetch."""
    commit_interval_s: float = 0.5
    """How often finished offsets are committed (a crash re-serves at most this much work)."""
    chunk_ms: float = 50.0
    """Token chunks of one request are sent at most this often: the first token at once, then
    what accumulated when the window has passed (0, with chunk_records_per_s 0: every engine
    output as its own chunk)."""
    chunk_tokens: int = 8
    """A request's accumulated tokens are sent at once when this many are waiting (with one
    token per step, a chunk never waits more than this many engine steps)."""
    chunk_records_per_s: float = 25.0
    """Token-chunk records per second this worker aims at under load: with S streams producing
    tokens, each waits max(chunk_ms, S / this) between chunks, or until chunk_tokens are
    waiting (0: always chunk_ms)."""
    resume: bool = True
    """Record each attempt's progress in the progress topic and continue an earlier attempt's
    tokens when a request comes back (after a crash, a moved partition or a hand-back)."""
    progress_tokens: int = 32
    """A progress record after this many newly acknowledged tokens of an attempt (a crash
    regenerates at most about this many per request)."""
    progress_s: float = 2.0
    """A progress record also when this many seconds passed since the last one (whichever of
    progress_tokens and progress_s comes first)."""
    progress_wait_s: float = 10.0
    """After a rebalance, how long a request waits for its partition's progress to be read
    before it starts from token 0 instead."""
    stall_timeout_s: float = 60.0
    """Work queued but no engine step finished for this long: /healthz fails, stages are logged."""
    log_prompts: bool = False
    """Log prompt text (debugging only; prompts are never logged otherwise)."""
    apply_topics: bool = True
    """Create missing topics at start, as `streamer topics apply` does (development: the
    embedded broker loses them on restart). Off (`--no-apply-topics`, what the deploy files
    set): create nothing, check that every topic the worker uses exists, and exit 1 naming the
    missing ones."""
    model_name: str = ""
    """Name the worker announces for its model on <prefix>.workers (what OpenAI clients pass
    as `model` to the gateway); empty: the last part of the model path."""
    announce_interval_s: float = 5.0
    """How often the worker announces itself (model, readiness) on <prefix>.workers; a change
    of readiness is announced at once."""

    @property
    def consumer_group(self) -> str:
        return consumer_group(self.prefix, self.group_id)

    @property
    def name(self) -> str:
        return self.worker_id or f"worker-{uuid.uuid4().hex[:8]}"

    @property
    def served_model_name(self) -> str:
        """The model's name on <prefix>.workers and in the gateway's /v1/models."""
        return self.model_name or PurePath(self.engine.model).name or self.engine.model

    def validate(self) -> None:
        errors = []
        for part in (self.engine, self.kafka, self.limits, self.cache):
            try:
                part.validate()
            except ValueError as exc:
                errors.append(str(exc))
        if not self.prefix or any(c.isspace() for c in self.prefix):
            errors.append(f"prefix={self.prefix!r} must be a non-empty topic-name prefix")
        if self.assignor not in ASSIGNORS:
            errors.append(f"assignor={self.assignor!r} is not one of {', '.join(ASSIGNORS)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            errors.append(f"metrics_port={self.metrics_port} is not a port")
        errors += _below(self, 1, "lane_capacity", "max_outstanding_outputs", "chunk_tokens",
                         "max_poll_records", "progress_tokens")
        errors += _below(self, 0, "cancel_window_s", "shutdown_grace_s", "revoke_wait_s",
                         "chunk_ms", "chunk_records_per_s", "fetch_max_wait_ms", "progress_s",
                         "progress_wait_s")

        errors += [f"{name}={getattr(self, name)} must be > 0"
                   for name in ("shutdown_timeout_s", "stall_timeout_s", "commit_interval_s",
                                "announce_interval_s")
                   if getattr(self, name) <= 0]
        if errors:
            raise ValueError("; ".join(errors))


def _below(config: object, least: float, *names: str) -> list[str]:
    """One message per field (None: unset, not checked) that is below `least`."""
    return [
        f"{name}={getattr(config, name)} must be >= {least}"
        for name in names
        if getattr(config, name) is not None and getattr(config, name) < least
    ]



GATEWAY_PRIORITIES = ("urgent", "high", "normal", "low")


@dataclass(frozen=True)
class GatewayConfig:
    """`streamer gateway`: the OpenAI-compatible HTTP front of the fleet (docs/gateway.md)."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    """How the gateway reaches the cluster."""
    prefix: str = field(default="llm", metadata={"env": "STREAMER_PREFIX"})
    """Topic prefix of the fleet it fronts."""
    group_id: str | None = field(default=None, metadata={"env": "STREAMER_GROUP_ID",
                                                         "aliases": ("--group",)})
    """The workers' consumer group, whose lag is the lanes' backlog; none: the default group of
    the prefix."""
    host: str = "0.0.0.0"
    """Address the HTTP server listens on."""
    port: int = 8000
    """HTTP port; 0 picks a free one (logged as gateway_listening)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False, metadata={"flag": "--api-key"})
    """Bearer tokens accepted, comma separated (a flag shows in `ps`: prefer the variable or
    api_key_file). No key at all: no authentication. Never logged."""
    api_key_file: str | None = None
    """File of accepted API keys, one a line (blank lines and # comments skipped), read at
    start and added to api_keys."""
    default_priority: str = "normal"
    """Lane of a request that names none (x-streamer-priority header or `priority` field)."""
    max_backlog: int | None = 1000
    """A lane whose backlog (its end offsets minus the workers' committed offsets, summed over
    its partitions) is above this answers new requests with 429; none disables the check."""
    backlog_refresh_s: float = 1.0
    """How often the lanes' backlog is read from Kafka."""
    request_timeout_s: float = 600.0
    """Longest a request may take: its deadline_ms is now plus this (a shorter
    x-streamer-timeout header wins); past it the answer is 504."""
    worker_ttl_s: float = 15.0
    """A worker whose last announcement on <prefix>.workers is older than this counts as gone."""
    batch_db: str = ".streamer/gateway.db"
    """SQLite file holding uploaded files, batches and their results (keep it on a volume)."""
    batch_priority: str = "low"
    """Lane of batch lines when the batch names none."""

    def validate(self) -> None:
        errors = []
        try:
            self.kafka.validate()
        except ValueError as exc:
            errors.append(str(exc))
        if not self.prefix or any(c.isspace() for c in self.prefix):
            errors.append(f"prefix={self.prefix!r} must be a non-empty topic-name prefix")
        if not 0 <= self.port < 65536:
            errors.append(f"port={self.port} is not a port")
        errors += [f"{name}={getattr(self, name)!r}; expected one of "
                   f"{', '.join(GATEWAY_PRIORITIES)}"
                   for name in ("default_priority", "batch_priority")
                   if getattr(self, name) not in GATEWAY_PRIORITIES]
        errors += _below(self, 0, "max_backlog")
        errors += [f"{name}={getattr(self, name)} must be > 0"
                   for name in ("backlog_refresh_s", "request_timeout_s", "worker_ttl_s")
                   if getattr(self, name) <= 0]
        if any(not key.strip() for key in self.api_keys):
            errors.append("api_keys must not contain an empty key")
        if errors:
            raise ValueError("; ".join(errors))
