"""Prometheus config, alerting rules and the Grafana dashboard.

The slow test runs Debian's real Prometheus on 127.0.0.1, scraping a running mone-serve through a short
mixed load, then evaluates every dashboard query through Prometheus's HTTP API: each must return data.
Grafana itself cannot be installed here, so the dashboard JSON is checked against the structure Grafana reads.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.live_server import free_port
from tests.support.deploy import DOCKER, stop_group, wait_http
from tests.support.media import png_bytes

PROM = DOCKER / "prometheus"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mone-serve.json"
# docs/serving.md section 5, the fixed names (histograms by their series names).
CONTRACT = {
    "mone_requests_total",
    "mone_request_duration_seconds_bucket",
    "mone_queue_duration_seconds_bucket",
    "mone_compute_duration_seconds_bucket",
    "mone_batch_size_bucket",
    "mone_request_gflops_bucket",
    "mone_capacity_served_bucket",
    "mone_gflops_total",
    "mone_gflops_dense_total",
    "mone_deadline_total",
    "mone_rejected_total",
    "mone_cancelled_total",
    "mone_queue_depth",
    "mone_inflight_requests",
    "mone_model_info",
}
HISTOGRAM_PARTS = re.compile(r"_(sum|count)$")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mone_[a-z_]+)", expr))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool missing: run scripts/setup-system.sh (Debian's prometheus)"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)


def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"MoneDeadlineMissRate", "MoneRejectionRate", "MoneNotReady"}
    for rule in rules:
        assert metric_names(rule["expr"]) <= {HISTOGRAM_PARTS.sub("_bucket", n) for n in CONTRACT} | CONTRACT


def test_alerts_fire_on_synthetic_histories() -> None:
    """docker/prometheus/alerts_test.yml: each alert fires when it should and stays quiet otherwise."""
    result = promtool("test", "rules", str(PROM / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where compose mounts it
    config["rule_files"] = [str(PROM / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_structure() -> None:
    dash = dashboard()
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    assert dash["uid"] == "mone-serve"
    assert isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, panel["title"]
        assert panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]  # noqa: PT018
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == source["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mone.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_covers_the_contract() -> None:
    used: set[str] = set()
    for _, expr in targets():
        used |= {HISTOGRAM_PARTS.sub("_bucket", n) for n in metric_names(expr)}
    assert used <= CONTRACT, used - CONTRACT  # no invented names
    assert used == CONTRACT, CONTRACT - used  # every contract metric is on the dashboard


def test_compose_file() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mone-serve", "prometheus", "grafana"}
    serve = services["mone-serve"]
    assert serve["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / serve["build"]["context"] / serve["build"]["dockerfile"]).exists()
    assert serve["read_only"] is True
    assert any(t.startswith("/tmp") for t in serve["tmpfs"])
    assert "MONE_API_KEY" in serve["environment"]
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DOCKER / source).exists(), source
    target = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    assert target["static_configs"][0]["targets"] == ["mone-serve:8000"]
    assert target["job_name"] == "mone-serve"


@pytest.fixture(scope="module")
def prometheus(local_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Prometheus on 127.0.0.1 with our config and rules, scraping `local_server` every second."""
    assert shutil.which("prometheus"), "prometheus missing: run scripts/setup-system.sh"
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROM / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [local_server.removeprefix("http://")]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/-/ready", 60, proc=proc)
        yield base
    finally:
        stop_group(proc)
        log.close()


def run_load(base: str, seconds: float) -> dict[int, int]:
    """A bounded mixed load: every budget kind, met and missed deadlines, and some bad requests."""
    jobs: list[dict[str, str] | None] = [
        {"capacity": "0.25"},
        {"capacity": "1.0"},
        {"gflops": "0.05"},
        {"latency_ms": "5000"},
        {"latency_ms": "0.5"},
        {},
        None,  # not an image: 4xx, counted as a rejection
    ]
    codes: dict[int, int] = {}

    def one(i: int) -> int:
        fields = jobs[i % len(jobs)]
        body = png_bytes(seed=i) if fields is not None else b"not an image at all"
        files = {"file": ("x.png", body, "image/png")}
        r = httpx.post(base + "/v1/classify", files=files, data=fields or {}, timeout=30)
        return r.status_code

    end = time.monotonic() + seconds
    i = 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        while time.monotonic() < end:
            for code in pool.map(one, range(i, i + 12)):
                codes[code] = codes.get(code, 0) + 1
            i += 12
    return codes


@pytest.mark.slow
def test_every_panel_query_returns_data(local_server: str, prometheus: str) -> None:
    codes = run_load(local_server, seconds=12)
    assert codes.get(200, 0) > 20, codes
    assert sum(n for c, n in codes.items() if c >= 400) > 0, codes
    time.sleep(3)  # a few more scrapes after the load

    empty = []
    for title, expr in targets():
        query = expr.replace("$__rate_interval", "1m")
        r = httpx.get(prometheus + "/api/v1/query", params={"query": query}, timeout=10)
        assert r.status_code == 200, (title, query, r.text)
        result = r.json()["data"]["result"]
        values = [float(s["value"][1]) for s in result]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, query, values))
    assert not empty, empty

    rules = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in rules for rule in group["rules"]]
    assert len(loaded) == 3
    assert all(rule["health"] == "ok" for rule in loaded), loaded


@pytest.mark.slow
def test_podman_compose_reads_the_compose_file() -> None:
    """podman-compose (1.0.3 has no `config`) prints the commands `up` would run; the posture survives."""
    assert shutil.which("podman-compose"), "podman-compose missing: run scripts/setup-system.sh"
    env = {**os.environ, "MONE_API_KEY": "compose-test-key"}
    env.setdefault("CONTAINERS_CONF", str(DOCKER / "containers.conf"))
    project = "mone-compose-test"
    try:
        result = subprocess.run(
            ["podman-compose", "-p", project, "-f", "compose.yaml", "--dry-run", "up", "-d"],
            cwd=DOCKER,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:  # its dry run still creates the project network
        subprocess.run(
            ["podman", "network", "rm", "--force", f"{project}_default"],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    (serve,) = [line for line in result.stdout.splitlines() if f"--name={project}_mone-serve_1" in line]
    for flag in ("--read-only", "--cap-drop ALL", "--tmpfs /tmp:", "-p 127.0.0.1:8000:8000"):
        assert flag in serve, flag
    assert "-e MONE_API_KEY=compose-test-key" in serve
    assert f"--name={project}_prometheus_1" in result.stdout
    assert f"--name={project}_grafana_1" in result.stdout
