"""Structural checks of the deployment files: Compose, Dockerfile, Prometheus, Grafana, Kubernetes.

No Docker engine or cluster runs here, so these tests check what can be checked offline: every
file parses, the wiring between files agrees (ports, paths, job names, consumer group, topics),
and every metric name a dashboard or alert uses is one the worker exports. Where a real tool is
on PATH (``promtool``; ``docker`` with an engine that answers), the tests also run it; each such
check is its own test, skipped with the reason when the tool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.observability.metrics import EXPORTED_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamer.json"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"

REQUEST_TOPICS = {
    "llm.requests.urgent",
    "llm.requests.high",
    "llm.requests.normal",
    "llm.requests.low",
}
CONSUMER_GROUP = "streamer-workers"
METRICS_PORT = 9400
SCRAPE_JOB = "streamer-workers"
#: Partitions per request topic that the KEDA maxReplicaCount is sized for (stated in
#: deploy/k8s/keda-scaledobject.yaml and docs/operations.md).
ASSUMED_PARTITIONS_PER_REQUEST_TOPIC = 12

_METRIC_RE = re.compile(r"\b(?:streamer|process)_[A-Za-z0-9_]+\b")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (quoted label values removed first)."""
    return set(_METRIC_RE.findall(_STRING_RE.sub('""', expr)))


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _k8s_docs() -> dict[str, dict[str, Any]]:
    """Every k8s object listed in kustomization.yaml, by kind."""
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    docs: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} objects"
                docs[doc["kind"]] = doc
    return docs


def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# --- every file parses ---------------------------------------------------------------------


def test_all_yaml_and_json_files_parse() -> None:
    yaml_files = [COMPOSE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]
    assert len(yaml_files) >= 12
    for path in yaml_files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    json_files = list(DEPLOY.rglob("*.json"))
    assert DASHBOARD in json_files
    for path in json_files:
        json.loads(path.read_text())


# --- metric names --------------------------------------------------------------------------


def test_alert_metric_names_are_exported() -> None:
    used: set[str] = set()
    for rule in _alert_rules():
        names = _metric_names(rule["expr"])
        assert names or "up{" in rule["expr"], f"no metric found in {rule['alert']}"
        used |= names
    assert used, "regex found no metric names at all"
    assert used <= EXPORTED_METRIC_NAMES, used - EXPORTED_METRIC_NAMES


def test_dashboard_metric_names_are_exported() -> None:
    used: set[str] = set()
    for expr in _dashboard_exprs():
        names = _metric_names(expr)
        assert names or "up{" in expr, f"no metric in {expr!r}"
        used |= names
    missing = used - EXPORTED_METRIC_NAMES
    assert not missing, missing
    # The dashboard covers what the operator guide promises.
    for needed in (
        "streamer_time_to_first_token_seconds_bucket",
        "streamer_time_per_output_token_seconds_bucket",
        "streamer_e2e_request_latency_seconds_bucket",
        "streamer_generation_tokens_total",
        "streamer_num_requests_waiting",
        "streamer_batch_size_sum",
        "streamer_kv_cache_usage_ratio",
        "streamer_kv_cache_blocks",
        "streamer_prefix_cache_hits_total",
        "streamer_prefix_cache_queries_total",
        "streamer_prefix_cache_hit_ratio",
        "streamer_stage_busy_seconds_total",
        "streamer_requests_total",
        "streamer_errors_total",
        "streamer_consumer_lag",
        "streamer_ready",
    ):
        assert needed in used, f"dashboard lacks {needed}"


def test_metric_regex_ignores_label_values() -> None:
    expr = 'sum(rate(streamer_requests_total{job="streamer-workers", x="streamer_fake"}[5m]))'
    assert _metric_names(expr) == {"streamer_requests_total"}


# --- Prometheus ----------------------------------------------------------------------------


def test_prometheus_scrapes_workers_by_dns() -> None:
    config = _load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    workers = jobs[SCRAPE_JOB]
    assert workers.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = workers["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == METRICS_PORT
    # Rule files are resolved relative to the config file.
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file


def test_alert_rules_cover_the_runbook() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    expected = {
        "StreamerHighTimeToFirstToken": ("streamer_time_to_first_token_seconds_bucket", "5m"),
        "StreamerHighErrorRate": ("streamer_requests_total", "5m"),
        "StreamerDeviceSaturated": ("streamer_device_utilization_ratio", None),
        "StreamerConsumerLagGrowing": ("streamer_consumer_lag", None),
        "StreamerWorkerNotReady": ("streamer_ready", "2m"),
        "StreamerWorkerDown": ("up", None),
        "StreamerNoWorkers": ("up", None),
    }
    for name, (metric, duration) in expected.items():
        rule = rules[name]
        assert metric in rule["expr"], name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        if duration:
            assert rule["for"] == duration, name
    assert "histogram_quantile(0.99" in rules["StreamerHighTimeToFirstToken"]["expr"]
    assert re.search(r"\)\s*>\s*1\s*$", rules["StreamerHighTimeToFirstToken"]["expr"].strip())
    assert 'outcome="failed"' in rules["StreamerHighErrorRate"]["expr"]
    assert "0.05" in rules["StreamerHighErrorRate"]["expr"]
    assert "0.95" in rules["StreamerDeviceSaturated"]["expr"]
    lag = rules["StreamerConsumerLagGrowing"]["expr"]
    assert "deriv(" in lag and "[10m:" in lag and re.search(r"\band\b", lag)
    assert "== 0" in rules["StreamerWorkerNotReady"]["expr"]
    # Every rule selects the same job the scrape config and PodMonitor produce.
    for rule in rules.values():
        assert f'job="{SCRAPE_JOB}"' in rule["expr"], rule["alert"]
    # The annotations link to the runbook section of the same name.
    runbook = (ROOT / "docs" / "operations.md").read_text()
    for name in rules:
        assert name in runbook, f"docs/operations.md has no entry for {name}"


def test_prometheusrule_mirrors_alerts_yml() -> None:
    rule = _load_yaml(K8S / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _load_yaml(ALERTS)["groups"]


promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not on PATH (Debian: apt-get install prometheus)"
)


@needs_promtool
def test_promtool_checks_config_and_rules() -> None:
    assert promtool is not None
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, is valid PromQL."""
    assert promtool is not None
    rules = [
        {
            "record": f"dashboard:query{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$priority", ".*"),
        }
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana -------------------------------------------------------------------------------


def test_grafana_dashboard_and_provisioning() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]

    datasources = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"

    providers = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/streamer.yml")
    (provider,) = providers["providers"]
    grafana = _load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# --- Compose and Dockerfile ----------------------------------------------------------------


def test_compose_services_and_wiring() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"kafka", "topics", "model-init", "worker", "kafka-ui", "prometheus", "grafana"} <= set(
        services
    )

    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "localhost:29092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "29092:29092" in kafka["ports"]
    assert "healthcheck" in kafka

    topics = services["topics"]
    assert topics["command"][:2] == ["topics", "apply"]
    # One Kafka broker: the specs' replication factor 3 cannot fit, so ask for 1 explicitly.
    assert topics["command"][topics["command"].index("--replication-factor") + 1] == "1"
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"

    model_init = services["model-init"]
    assert model_init["command"][:3] == ["model", "init-tiny", "/models/tiny"]
    assert any(v.startswith("models:/models") for v in model_init["volumes"])

    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name prevents --scale"
    assert "ports" not in worker, "a fixed host port prevents --scale"
    assert "build" in worker
    command = worker["command"]
    assert command[0] == "worker"
    assert "--no-apply-topics" in command, "the topics job creates topics, workers never do"
    assert command[command.index("--model") + 1] == "/models/tiny"
    assert worker["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert any(v.startswith("models:/models") for v in worker["volumes"])
    health = " ".join(worker["healthcheck"]["test"])
    assert f"{METRICS_PORT}/readyz" in health
    deps = worker["depends_on"]
    assert deps["model-init"]["condition"] == "service_completed_successfully"
    assert deps["topics"]["condition"] == "service_completed_successfully"
    assert deps["kafka"]["condition"] == "service_healthy"
    if "--metrics-port" in command:
        assert int(command[command.index("--metrics-port") + 1]) == METRICS_PORT

    ui = services["kafka-ui"]
    assert ui["image"].startswith("ghcr.io/kafbat/kafka-ui")
    assert ui["environment"]["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"] == "kafka:9092"
    assert "8080:8080" in ui["ports"]

    prometheus = services["prometheus"]
    assert "9090:9090" in prometheus["ports"]
    assert any(v.startswith("./deploy/prometheus:/etc/prometheus") for v in prometheus["volumes"])

    grafana = services["grafana"]
    assert "3000:3000" in grafana["ports"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    # Every bind-mounted path exists in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
            else:
                assert source in compose["volumes"], source


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines[0] == "FROM python:3.11-slim"
    torch_line = next(i for i, line in enumerate(lines) if "pip install torch==" in line)
    package_line = next(
        i for i, line in enumerate(lines) if line.startswith("RUN pip install") and i != torch_line
    )
    assert torch_line < package_line, "torch must be installed (pinned, CPU) before the package"
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", text)
    assert pinned and pinned.group(1) == "2.13.0"
    # Same torch as the Makefile installs, so the image runs what the tests ran.
    makefile = re.search(r"^TORCH_VERSION\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if makefile:
        assert makefile.group(1) == pinned.group(1)
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert 'ENTRYPOINT ["streamer"]' in lines

    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.skipif(
    not _docker_engine_answers(),
    reason="no Docker engine answers `docker info` here; compose file checked structurally only",
)
def test_docker_compose_config_is_valid() -> None:
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if version.returncode != 0:
        pytest.skip("Docker engine answers but the `docker compose` plugin is not installed")
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ----------------------------------------------------------------------------


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p for p in container["ports"] if p.get("name") == port]
    return int(match["containerPort"])


def test_k8s_deployment_probes_and_config() -> None:
    docs = _k8s_docs()
    assert {"ConfigMap", "Deployment", "ScaledObject", "PodMonitor", "PrometheusRule"} <= set(docs)
    config = docs["ConfigMap"]["data"]
    assert int(config["STREAMER_METRICS_PORT"]) == METRICS_PORT

    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == 60
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    (worker,) = [c for c in spec["containers"] if c["name"] == "worker"]
    assert worker["args"][0] == "worker"
    assert worker["args"][worker["args"].index("--group") + 1] == CONSUMER_GROUP
    assert worker["args"][worker["args"].index("--prefix") + 1] == "llm"
    assert "--no-apply-topics" in worker["args"], "topics-job.yaml creates topics, workers never"
    assert {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}} in worker["envFrom"]

    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        http = worker[probe]["httpGet"]
        assert http["path"] == path, probe
        assert _resolve_port(worker, http["port"]) == METRICS_PORT, probe

    resources = worker["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_keda_scaledobject() -> None:
    docs = _k8s_docs()
    scaled = docs["ScaledObject"]["spec"]
    deployment = docs["Deployment"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    containers = {c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert scaled["scaleTargetRef"]["envSourceContainerName"] in containers

    # More consumers than partitions sit idle: never allow more replicas than partitions.
    assert 1 <= scaled["maxReplicaCount"] <= ASSUMED_PARTITIONS_PER_REQUEST_TOPIC
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]

    triggers = scaled["triggers"]
    assert all(t["type"] == "kafka" for t in triggers)
    assert {t["metadata"]["topic"] for t in triggers} == REQUEST_TOPICS
    assert len(triggers) == len(REQUEST_TOPICS)
    config = docs["ConfigMap"]["data"]
    for trigger in triggers:
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == CONSUMER_GROUP
        assert int(meta["lagThreshold"]) > 0
        # KEDA's trigger metadata is a map of strings; a YAML int or bool would be rejected.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert meta.get("allowIdleConsumers", "false") == "false"
        if "bootstrapServersFromEnv" in meta:
            assert meta["bootstrapServersFromEnv"] in config
        else:
            assert meta["bootstrapServers"]
    text = (K8S / "keda-scaledobject.yaml").read_text()
    assert f"{ASSUMED_PARTITIONS_PER_REQUEST_TOPIC} partitions" in text, "state the assumption"


def test_podmonitor_selects_worker_pods_on_metrics_port() -> None:
    docs = _k8s_docs()
    monitor = docs["PodMonitor"]["spec"]
    pod = docs["Deployment"]["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    (worker,) = [c for c in pod["spec"]["containers"] if c["name"] == "worker"]
    assert _resolve_port(worker, endpoint["port"]) == METRICS_PORT
    assert endpoint["path"] == "/metrics"
    # Same job label as the Compose scrape config, so alerts and dashboard work unchanged.
    assert {"targetLabel": "job", "replacement": SCRAPE_JOB} in endpoint["relabelings"]


def test_k8s_topics_job_creates_production_topics() -> None:
    docs = _k8s_docs()
    job = docs["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["topics", "apply"]
    assert args[args.index("--prefix") + 1] == "llm"
    # Explicit, so a cluster with fewer brokers fails the Job instead of being clamped to.
    assert int(args[args.index("--replication-factor") + 1]) == 3
    assert {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}} in container["envFrom"]
    deployment = docs["Deployment"]["spec"]["template"]["spec"]
    (worker,) = [c for c in deployment["containers"] if c["name"] == "worker"]
    assert container["image"] == worker["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_keda_scales_up_one_pod_at_a_time() -> None:
    behavior = _k8s_docs()["ScaledObject"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"][
        "behavior"]
    up = behavior["scaleUp"]
    assert up["policies"] and all(p["type"] == "Pods" and p["value"] == 1 for p in up["policies"])
    assert up.get("selectPolicy", "Max") != "Disabled"
    down = behavior["scaleDown"]
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])


def test_k8s_statefulset_example_is_the_deployment_with_static_membership() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "statefulset.yaml").read_text()) if d}
    sts, service = docs["StatefulSet"], docs["Service"]
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    deployment = _k8s_docs()["Deployment"]
    assert sts["spec"]["selector"] == deployment["spec"]["selector"]
    template = sts["spec"]["template"]
    (worker,) = [c for c in template["spec"]["containers"] if c["name"] == "worker"]
    static = [e for e in worker["env"] if e["name"] == "STREAMER_GROUP_INSTANCE_ID"]
    assert static == [{"name": "STREAMER_GROUP_INSTANCE_ID",
                       "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    # Otherwise the same pod as deployment.yaml, so the two cannot drift apart.
    worker["env"] = [e for e in worker["env"] if e not in static]
    assert template == deployment["spec"]["template"]
    assert "statefulset.yaml" not in _load_yaml(K8S / "kustomization.yaml")["resources"]
