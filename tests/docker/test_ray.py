"""Ray Serve scale-out on a local Ray cluster (2 CPUs, 127.0.0.1): two replicas of the same app both serve,
budgets are honoured through Ray's proxy, and /metrics covers both replicas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.schema import ServeDeploySchema

from mone.server.config import Settings
from mone.server.ray_app import REPLICA_HEADER, MoneServe, app_builder
from tests.live_server import free_port
from tests.support.deploy import DOCKER, FAST_ENV, wait_http
from tests.support.media import png_bytes


@pytest.fixture(scope="module")
def ray_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    metrics_dir = tmp_path_factory.mktemp("ray-metrics")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    env = {**FAST_ENV, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deployment = MoneServe.options(num_replicas=2, autoscaling_config=None)
        serve.run(deployment.bind({}), name="mone", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", 180)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def classify(base: str, fields: dict[str, str], seed: int) -> httpx.Response:
    files = {"file": ("x.png", png_bytes(seed=seed), "image/png")}
    return httpx.post(base + "/v1/classify", files=files, data=fields, timeout=60)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.slow
def test_two_replicas_serve_with_budgets_and_metrics(ray_base: str) -> None:
    budgets = [{"capacity": "0.25"}, {"capacity": "1.0"}, {"gflops": "0.05"}, {"latency_ms": "5000"}]
    jobs = [(budgets[i % len(budgets)], i) for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda job: classify(ray_base, *job), jobs))

    assert [r.status_code for r in responses] == [200] * len(jobs), responses[0].text
    replicas = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(replicas) == 2, replicas

    for (fields, _), r in zip(jobs, responses, strict=True):
        body = r.json()
        served = body["served"]
        if "capacity" in fields:
            assert served["capacity"] == pytest.approx(float(fields["capacity"]))
        elif "gflops" in fields:
            assert served["gflops"] <= float(fields["gflops"]) + 1e-9
            assert served["gflops"] < served["dense_gflops"]
        else:
            assert body["requested"]["type"] == "latency_ms"
            assert served["deadline_met"] is True

    # Both replicas write to one PROMETHEUS_MULTIPROC_DIR: either one's /metrics counts every request.
    text = httpx.get(ray_base + "/metrics", timeout=10).text
    ok = metric_value(text, "mone_requests_total", route="/v1/classify", code="200")
    assert ok == len(jobs), text[:4000]
    assert metric_value(text, "mone_deadline_total", outcome="met") == len(jobs) // len(budgets)
    assert metric_value(text, "mone_gflops_total") < metric_value(text, "mone_gflops_dense_total")


def test_serve_config_file_matches_the_deployment() -> None:
    config = yaml.safe_load((DOCKER / "ray" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("mone.server.ray_app", "app_builder")
    Settings(**app["args"])  # every arg is a valid setting
    (deployment,) = app["deployments"]
    assert deployment["name"] == MoneServe.name
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] <= scaling["max_replicas"]
    assert 0 < scaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
    assert app_builder(app["args"]) is not None
