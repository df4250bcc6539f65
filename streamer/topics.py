"""Topics as code: load topics/*.yaml and create what is missing, reporting what differs.

The specs say what production needs (replication factor 3, `min.insync.replicas` 2, retention per
topic). A cluster with fewer brokers than that (the embedded broker has one) gets, from the specs,
a replication factor lowered to its broker count, with a `clamped` line in the report; a
replication factor asked for explicitly (`--replication-factor N`) is never lowered: a cluster
that cannot hold it is an error naming both numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamer import protocol
from streamer.config import KafkaSettings

TOPICS_DIR = Path(__file__).resolve().parent.parent / "topics"
_KEYS = {"name", "purpose", "partitions", "replication_factor", "min_insync_replicas",
         "retention_ms", "cleanup_policy"}


class TopicsError(RuntimeError):
    """Topics cannot be applied or are missing; the message says which and what to do."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    purpose: str
    partitions: int
    replication_factor: int
    min_insync_replicas: int
    retention_ms: int
    cleanup_policy: str

    def min_insync(self, replication_factor: int) -> int:
        """`min.insync.replicas` for a topic created with `replication_factor` replicas: the
        spec's own value at the spec's factor; under another factor at most factor - 1 (so one
        broker may be down and writes with acks=all go on), and at least 1."""
        if replication_factor == self.replication_factor:
            return self.min_insync_replicas
        return max(1, min(self.min_insync_replicas, replication_factor - 1))

    def configs(self, replication_factor: int | None = None) -> dict[str, str]:
        rf = replication_factor or self.replication_factor
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy,
                "min.insync.replicas": str(self.min_insync(rf))}


def specs_dir() -> Path:
    """$STREAMER_TOPICS_DIR, else topics/ of the source tree (the image sets the variable)."""
    configured = os.environ.get("STREAMER_TOPICS_DIR")
    if configured:
        return Path(configured)
    if TOPICS_DIR.is_dir():
        return TOPICS_DIR
    raise FileNotFoundError(
        "no topic specs: set STREAMER_TOPICS_DIR to a folder of topic YAML files "
        f"(looked in {TOPICS_DIR})")


def load_specs(prefix: str = "llm", directory: Path | None = None) -> list[TopicSpec]:
    specs = []
    for path in sorted((directory or specs_dir()).glob("*.yaml")):
        raw: dict[str, Any] = yaml.safe_load(path.read_text())
        if missing := _KEYS - raw.keys():
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        spec = TopicSpec(
            name=str(raw["name"]).format(prefix=prefix),
            purpose=str(raw["purpose"]),
            partitions=int(raw["partitions"]),
            replication_factor=int(raw["replication_factor"]),
            min_insync_replicas=int(raw["min_insync_replicas"]),
            retention_ms=int(raw["retention_ms"]),
            cleanup_policy=str(raw["cleanup_policy"]),
        )
        if not 1 <= spec.min_insync_replicas <= spec.replication_factor:
            raise ValueError(f"{path}: min_insync_replicas={spec.min_insync_replicas} must be "
                             f"in 1..replication_factor ({spec.replication_factor})")
        specs.append(spec)
    return specs


def worker_topics(prefix: str) -> list[str]:
    """Every topic a worker reads or writes: the four lanes, outputs, control, DLQ, progress,
    announcements."""
    return [*(protocol.request_topic(prefix, p) for p in protocol.PRIORITIES),
            protocol.tokens_topic(prefix), protocol.events_topic(prefix),
            protocol.control_topic(prefix), protocol.dlq_topic(prefix),
            protocol.progress_topic(prefix), protocol.workers_topic(prefix)]


@dataclass(frozen=True)
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    differences: list[str]
    clamped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"clamped   {text}" for text in self.clamped]
        out += [f"created   {name}" for name in self.created]
        out += [f"ok        {name}" for name in self.unchanged]
        out += [f"differs   {text}" for text in self.differences]
        return out


def replication_plan(specs: list[TopicSpec], brokers: int, requested: int | None
                     ) -> tuple[dict[str, int], list[str]]:
    """Replication factor per topic, and a note for each spec whose factor the cluster is too
    small for. `requested` (an explicit --replication-factor) is never lowered: TopicsError."""
    if requested is not None:
        if requested < 1:
            raise TopicsError(f"--replication-factor {requested}: must be at least 1")
        if requested > brokers:
            raise TopicsError(
                f"--replication-factor {requested} needs at least {requested} brokers; the "
                f"cluster has {brokers}. Add brokers, or ask for at most {brokers} "
                "(a replication factor below 3 is for development only)")
        return {s.name: requested for s in specs}, []
    plan = {s.name: min(s.replication_factor, brokers) for s in specs}
    lowered: dict[int, int] = {}  # spec's factor -> topics lowered from it
    for spec in specs:
        if spec.replication_factor > brokers:
            lowered[spec.replication_factor] = lowered.get(spec.replication_factor, 0) + 1
    notes = [f"replication factor {brokers} instead of the spec's {want} for {count} "
             f"topic{'s' if count != 1 else ''}: the cluster has {brokers} broker"
             f"{'s' if brokers != 1 else ''} (development only; production needs {want})"
             for want, count in sorted(lowered.items())]
    return plan, notes


async def apply_topics(
    kafka: KafkaSettings, prefix: str = "llm", replication_factor: int | None = None
) -> ApplyReport:
    """Create missing topics; report (never change) existing ones whose settings differ."""
    specs = load_specs(prefix)
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        plan, _ = replication_plan(specs, brokers, replication_factor)
        existing = set(await admin.list_topics())
        to_create = [s for s in specs if s.name not in existing]
        _, clamped = replication_plan(to_create, brokers, replication_factor)
        created: list[str] = []
        if to_create:
            response = await admin.create_topics([
                NewTopic(s.name, s.partitions, plan[s.name], topic_configs=s.configs(plan[s.name]))
                for s in to_create
            ])
            for name, code, message in response.topic_errors:
                if code not in (0, 36):  # 36: created concurrently by another worker: fine
                    raise TopicsError(f"creating topic {name} failed: {code} {message}")
                created.append(name)
        present = [s for s in specs if s.name in existing]
        differences = await _differences(admin, present, plan)
        differing = {d.split(":")[0] for d in differences}
        unchanged = [s.name for s in present if s.name not in differing]
        return ApplyReport(created, unchanged, differences, clamped)
    finally:
        await admin.close()


async def missing_topics(kafka: KafkaSettings, names: list[str]) -> list[str]:
    """Those of `names` the cluster does not have. Lists all topics rather than asking for these
    by name: a metadata request naming a topic can auto-create it (the embedded broker does)."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [name for name in names if name not in existing]


async def _differences(admin: AIOKafkaAdminClient, specs: list[TopicSpec],
                       plan: dict[str, int]) -> list[str]:
    if not specs:
        return []
    out: list[str] = []
    described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in specs])}
    configs: dict[str, dict[str, str]] = {}
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs]
        )
        for response in responses:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                configs[name] = {e[0]: e[1] for e in entries}
    except Exception:  # some brokers refuse DescribeConfigs; partitions still get compared
        configs = {}
    for spec in specs:
        partitions = described.get(spec.name, {}).get("partitions") or []
        if partitions and len(partitions) != spec.partitions:
            out.append(f"{spec.name}: partitions {len(partitions)} (spec {spec.partitions})")
        replicas = min((len(p["replicas"]) for p in partitions), default=None)
        if replicas is not None and replicas < plan[spec.name]:
            out.append(f"{spec.name}: replication factor {replicas} (wanted {plan[spec.name]})")
        for key, want in spec.configs(plan[spec.name]).items():
            got = configs.get(spec.name, {}).get(key)
            if got is not None and got != want:
                out.append(f"{spec.name}: {key}={got} (spec {want})")
    return out
