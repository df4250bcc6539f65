"""Topics as code: load topics/*.yaml and create what is missing, reporting what differs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamer.config import KafkaSettings

TOPICS_DIR = Path(__file__).resolve().parent.parent / "topics"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    purpose: str
    partitions: int
    replication_factor: int
    retention_ms: int
    cleanup_policy: str

    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


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
        missing = {"name", "purpose", "partitions", "replication_factor", "retention_ms",
                   "cleanup_policy"} - raw.keys()
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        specs.append(
            TopicSpec(
                name=str(raw["name"]).format(prefix=prefix),
                purpose=str(raw["purpose"]),
                partitions=int(raw["partitions"]),
                replication_factor=int(raw["replication_factor"]),
                retention_ms=int(raw["retention_ms"]),
                cleanup_policy=str(raw["cleanup_policy"]),
            )
        )
    return specs


@dataclass(frozen=True)
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    differences: list[str]

    def lines(self) -> list[str]:
        out = [f"created   {name}" for name in self.created]
        out += [f"ok        {name}" for name in self.unchanged]
        out += [f"differs   {text}" for text in self.differences]
        return out


async def apply_topics(
    kafka: KafkaSettings, prefix: str = "llm", replication_factor: int | None = None
) -> ApplyReport:
    """Create missing topics; report (never change) existing ones whose settings differ."""
    specs = load_specs(prefix)
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        to_create = [s for s in specs if s.name not in existing]
        created: list[str] = []
        if to_create:
            response = await admin.create_topics([
                NewTopic(s.name, s.partitions, replication_factor or s.replication_factor,
                         topic_configs=s.configs())
                for s in to_create
            ])
            for name, code, message in response.topic_errors:
                if code not in (0, 36):  # 36: created concurrently by another worker: fine
                    raise RuntimeError(f"creating topic {name} failed: {code} {message}")
                created.append(name)
        present = [s for s in specs if s.name in existing]
        differences = await _differences(admin, present)
        differing = {d.split(":")[0] for d in differences}
        unchanged = [s.name for s in present if s.name not in differing]
        return ApplyReport(created, unchanged, differences)
    finally:
        await admin.close()


async def _differences(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> list[str]:
    if not specs:
        return []
    out: list[str] = []
    described = await admin.describe_topics([s.name for s in specs])
    partitions = {t["topic"]: len(t["partitions"]) for t in described}
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
        have = partitions.get(spec.name)
        if have is not None and have != spec.partitions:
            out.append(f"{spec.name}: partitions {have} (spec {spec.partitions})")
        for key, want in spec.configs().items():
            got = configs.get(spec.name, {}).get(key)
            if got is not None and got != want:
                out.append(f"{spec.name}: {key}={got} (spec {want})")
    return out
