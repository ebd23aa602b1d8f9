"""Kubernetes manifests: rendered with `kubectl kustomize` (no cluster runs here) and checked for the things
that break deployments silently: probe paths and ports, selectors, graceful termination, security context,
settings names."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml

from mone.server.config import Settings
from mone.server.http.app import create_app
from tests.support.deploy import DOCKER

K8S = DOCKER / "k8s"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    assert shutil.which("kubectl"), "kubectl missing: run scripts/setup-system.sh (kubernetes-client)"
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}


def container_of(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return dict(container)


def routes() -> set[str]:
    return set(create_app(Settings(random_init=True)).openapi()["paths"])


def settings_env(container: dict[str, Any]) -> dict[str, str]:
    env = {e["name"]: e.get("value", "<secret>") for e in container.get("env", [])}
    for name in env:
        assert name.startswith("MONE_"), name
        assert name.removeprefix("MONE_").lower() in Settings.model_fields, name
    return env


def test_kustomize_renders_everything(rendered: dict[str, dict[str, Any]]) -> None:
    assert set(rendered) == {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in rendered.values():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "mone"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mone-serve"


def test_deployment_probes_ports_and_termination(rendered: dict[str, dict[str, Any]]) -> None:
    deployment = rendered["Deployment"]
    pod = deployment["spec"]["template"]
    container = container_of(pod["spec"])
    assert container["image"].startswith("registry.example.com/mone-serve:")
    ports = {p["name"]: p for p in container["ports"]}
    assert set(ports) == {"http", "health", "grpc"}
    port, health, grpc = ports["http"], ports["health"], ports["grpc"]
    env = settings_env(container)
    assert int(env["MONE_PORT"]) == port["containerPort"]
    assert int(env["MONE_HEALTH_PORT"]) == health["containerPort"] != port["containerPort"]
    assert int(env["MONE_GRPC_PORT"]) == grpc["containerPort"]
    assert len({p["containerPort"] for p in ports.values()}) == 3
    assert env["MONE_HOST"] == "0.0.0.0"
    assert env["MONE_WORKERS"] == "1", "one process per pod: the kubelet restarts a stuck one"
    assert container["env"][[e["name"] for e in container["env"]].index("MONE_API_KEY")]["valueFrom"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in (
            "/healthz",
            "/readyz",
        )  # what the probe listener answers (server/http/health.py)
        assert get["port"] in (health["name"], health["containerPort"])
    service = {p["name"]: p for p in rendered["Service"]["spec"]["ports"]}
    assert set(service) == {"http", "grpc"}  # not the probe listener
    assert service["http"]["targetPort"] in (port["name"], port["containerPort"])
    assert service["grpc"]["targetPort"] in (grpc["name"], grpc["containerPort"])
    drain = int(env["MONE_TIMEOUT_GRACEFUL_SHUTDOWN"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + pre_stop
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_deployment_security_context(rendered: dict[str, dict[str, Any]]) -> None:
    spec = rendered["Deployment"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's USER
    container = container_of(spec)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    (volume,) = spec["volumes"]
    assert volume["name"] == mount["name"]
    assert "emptyDir" in volume


def test_service_and_hpa_match_the_deployment(rendered: dict[str, dict[str, Any]]) -> None:
    deployment, service, hpa = (
        rendered["Deployment"],
        rendered["Service"],
        rendered["HorizontalPodAutoscaler"],
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container_of(deployment["spec"]["template"]["spec"])["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metric_names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert metric_names <= {"mone_inflight_requests", "mone_queue_depth"}


def test_kserve_inference_service_uses_the_oip_routes() -> None:
    isvc = yaml.safe_load((K8S / "kserve-inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    container = container_of(isvc["spec"]["predictor"])
    env = settings_env(container)
    (port,) = container["ports"]
    assert int(env["MONE_PORT"]) == port["containerPort"]
    assert env["MONE_WORKERS"] == "1", "the pod sets no CPU limit: auto would count the node's cores"
    paths = routes()
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"].startswith("/v2/")
        assert get["path"] in paths
        assert get["port"] == port["containerPort"]
    assert "/v2/models/{name}/infer" in paths
    assert Settings(model_name=env["MONE_MODEL_NAME"], allow_unauthenticated=True, host="0.0.0.0")
    assert isvc["metadata"]["name"] == env["MONE_MODEL_NAME"]
