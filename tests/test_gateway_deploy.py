"""The gateway's deployment files: the Compose service, the Kubernetes manifests, the scrape job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_K8S = ROOT / "deploy" / "k8s" / "gateway"
PORT = 8000


def _k8s() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((GATEWAY_K8S / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((GATEWAY_K8S / resource).read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_compose_gateway_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["command"][0] == "gateway"
    assert gateway["command"][gateway["command"].index("--port") + 1] == str(PORT)
    assert f"{PORT}:{PORT}" in gateway["ports"]
    assert gateway["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    (volume,) = gateway["volumes"]
    name, mount = volume.split(":")
    assert name in compose["volumes"]
    assert gateway["environment"]["STREAMER_GATEWAY_BATCH_DB"].startswith(mount + "/")
    assert f"{PORT}/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["streamer-gateway"]["static_configs"][0]["targets"] == [f"gateway:{PORT}"]


def test_k8s_gateway_deployment_service_volume_and_monitor() -> None:
    docs = _k8s()
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim", "PodMonitor"}
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one owner of the batch volume
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[0] == "gateway" and args[args.index("--port") + 1] == str(PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == PORT
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["STREAMER_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["STREAMER_GATEWAY_BATCH_DB"]["value"].startswith(mounts["data"] + "/")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http"
    monitor = docs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["podMetricsEndpoints"][0] == {"port": "http", "path": "/metrics",
                                                  "interval": "15s"}


def test_the_gateway_package_is_installed_with_streamer() -> None:
    """The image installs the package with setuptools: a folder without __init__.py is left out."""
    from setuptools import find_packages

    assert "streamer.gateway" in find_packages(str(ROOT), include=["streamer*"])
