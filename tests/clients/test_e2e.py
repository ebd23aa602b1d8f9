"""The client and the `mone` CLI against a real mone-serve process (random Mi/4) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mone.clients import AsyncMoneClient, BadRequest, MoneClient, Unauthorized
from mone.clients.cli import main
from tests.live_server import start_server, stop_server
from tests.support import ROOT
from tests.support.media import clip_frames, picture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[MoneClient]:
    with MoneClient(server_url, timeout=30) as c:
        yield c


def test_classify_every_input_form(client: MoneClient, image_path: Path) -> None:
    by_path = client.classify(image_path, capacity=1.0, top_k=3)
    same = [
        client.classify(image_path.read_bytes(), capacity=1.0, top_k=3),
        client.classify(Image.open(image_path), capacity=1.0, top_k=3),
        client.classify(picture(), capacity=1.0, top_k=3),
    ]
    assert len(by_path.top_k) == 3
    for r in same:
        assert [p.index for p in r.top_k] == [p.index for p in by_path.top_k]
        assert r.gflops == pytest.approx(by_path.gflops)
    assert by_path.native is not None
    assert by_path.native.kind == "image"


def test_clip_from_array_with_routing(client: MoneClient) -> None:
    r = client.classify(clip_frames(), capacity=0.5, routing=True)
    assert r.native is not None
    assert r.native.kind == "clip"
    assert r.routing is not None
    assert len(r.routing) == r.native.frames
    assert len(r.routing[0]) == 7  # Mi/4: 28 / 4 patches a side
    assert r.gflops < r.dense_gflops


def test_budgets(client: MoneClient) -> None:
    dense = client.classify(picture(), capacity=1.0)
    cheap = client.classify(picture(), capacity=0.25)
    assert cheap.capacity == pytest.approx(0.25)
    assert cheap.gflops < dense.gflops
    assert dense.gflops == pytest.approx(dense.dense_gflops)
    fitted = client.classify(picture(), gflops=0.06)
    assert fitted.gflops <= 0.06
    # A generous latency budget is met; an impossible one is served (at the floor, or at a capacity measured
    # no slower) and reported missed.
    timed = client.classify(picture(), latency_ms=200)
    assert timed.deadline_met is True
    assert timed.timing.total_ms < 200
    hopeless = client.classify(picture(), latency_ms=0.001)
    assert hopeless.deadline_met is False
    assert hopeless.native is not None
    assert hopeless.native.served.realised_capacity >= 0.125
    assert hopeless.native.served.planned_ms is not None
    assert hopeless.native.served.planned_ms > 0.001


def test_oip_matches_native(client: MoneClient, server_url: str) -> None:
    native = client.classify(picture(), capacity=0.5)
    with MoneClient(server_url, protocol="oip") as oip:
        other = oip.classify(picture(), capacity=0.5)
        clip = oip.classify(clip_frames(), gflops=0.5)
        with pytest.raises(ValueError, match="native API only"):
            oip.classify(picture(), routing=True)
    assert 0 < clip.gflops <= 0.5
    assert other.protocol == "oip"
    assert other.top_k[0].index == native.top_k[0].index
    assert other.top_k[0].label == native.top_k[0].label
    assert other.gflops == pytest.approx(native.gflops)
    assert other.capacity == pytest.approx(native.capacity)


def test_errors_carry_the_server_message(client: MoneClient) -> None:
    with pytest.raises(BadRequest) as bad_file:
        client.classify(b"this is not an image")
    assert bad_file.value.status == 415
    assert bad_file.value.code == "unsupported_media_type"
    assert "unsupported format" in bad_file.value.message
    with pytest.raises(BadRequest) as bad_budget:
        client.classify(picture(), gflops=1e-6)
    assert (bad_budget.value.status, bad_budget.value.code) == (422, "invalid_budget")
    assert bad_budget.value.message


def test_metadata_and_health(client: MoneClient) -> None:
    assert client.health()
    assert client.ready()
    models = client.models()
    assert models[0].name == "mone"
    info = client.model("mone")
    assert info.labels[0] == "tshirt"
    assert info.profile[0].capacity == pytest.approx(0.125)
    assert info.profile[-1].accuracy == pytest.approx(0.9)


def test_async_client(server_url: str) -> None:
    async def go() -> list[float]:
        async with AsyncMoneClient(server_url) as c:
            assert await c.ready()
            results = await asyncio.gather(
                *(c.classify(picture(i), capacity=0.25 * (1 + i % 4)) for i in range(4))
            )
        return [r.capacity for r in results]

    assert asyncio.run(go()) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_api_key(checkpoint_dir: Path) -> None:
    proc, base = start_server(checkpoint_dir, "--api-key", "s3cret-key-for-tests")
    try:
        with MoneClient(base, api_key=None) as anonymous, pytest.raises(Unauthorized) as info:
            anonymous.models()
        assert info.value.code == "unauthorized"
        with MoneClient(base, api_key="s3cret-key-for-tests") as keyed:
            assert keyed.classify(picture(), capacity=0.5).capacity == pytest.approx(0.5)
    finally:
        stop_server(proc)


# -- the CLI -------------------------------------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_cli_classify_table_json_routing(
    server_url: str, image_path: Path, clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(capsys, "--url", server_url, "classify", str(image_path), "--capacity", "0.5")
    assert code == 0
    assert "capacity 0.500" in out
    assert "label" in out
    assert "GFLOPs" in out

    code, out = run_cli(capsys, "--url", server_url, "classify", str(image_path), "--top-k", "2", "--json")
    record = json.loads(out)
    assert code == 0
    assert record["file"] == str(image_path)
    assert len(record["top_k"]) == 2

    args = [str(image_path), str(clip_path), "--routing", "--out", str(tmp_path / "maps"), "--json"]
    code, out = run_cli(capsys, "--url", server_url, "classify", *args)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    image_map, clip_map = (Image.open(r["routing_png"]) for r in records)
    assert image_map.width < clip_map.width  # the clip is drawn frame by frame
    assert np.asarray(clip_map).std() > 10


def test_budget_kinds_from_the_server(
    client: MoneClient, server_url: str, image_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [k.name for k in client.budget_kinds()] == ["capacity", "gflops", "latency_ms"]
    generic = client.classify(picture(), budget={"gflops": 0.06})
    assert generic.native is not None
    assert generic.native.requested.type == "gflops"
    assert generic.gflops <= 0.06
    with MoneClient(server_url, protocol="oip") as oip:
        assert oip.classify(picture(), budget={"latency_ms": 500}).deadline_met is not None
    with pytest.raises(ValueError, match="unknown budget kind 'joules'"):
        client.classify(picture(), budget={"joules": 1.0})

    code, out = run_cli(capsys, "--url", server_url, "classify", str(image_path), "--budget", "capacity=0.5")
    assert code == 0
    assert "capacity 0.500" in out
    assert main(["--url", server_url, "classify", str(image_path), "--budget", "joules=1"]) == 2
    assert "unknown budget kind 'joules'" in capsys.readouterr().err
    code, out = run_cli(capsys, "--url", server_url, "models")
    assert all(f"--budget {kind}=VALUE" in out for kind in ("capacity", "gflops", "latency_ms"))
    bench = ["bench", str(image_path), "--requests", "2", "--concurrency", "1", "--mix", "joules=1"]
    assert main(["--url", server_url, *bench]) == 2
    assert "TYPE one of ('capacity', 'gflops', 'latency_ms')" in capsys.readouterr().err


def test_cli_reports_errors(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["--url", server_url, "classify", str(bad)]) == 1
    assert "unsupported format" in capsys.readouterr().err


def test_cli_models_health_profile(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_cli(capsys, "--url", server_url, "models")
    assert code == 0
    assert "Mi/4" in out
    code, out = run_cli(capsys, "--url", server_url, "health", "--json")
    assert code == 0
    assert json.loads(out)["ready"] is True
    png = tmp_path / "profile.png"
    code, out = run_cli(capsys, "--url", server_url, "profile", "--out", str(png))
    assert code == 0
    assert "0.125" in out
    assert Image.open(png).size[0] > 600


def test_cli_bench(server_url: str, image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mix = "capacity=1.0:0.5,capacity=0.25:0.5"
    closed = ["bench", str(image_path), "--concurrency", "2", "--requests", "8", "--mix", mix, "--json"]
    code, out = run_cli(capsys, "--url", server_url, *closed)
    d = json.loads(out)
    assert code == 0
    assert (d["mode"], d["requests"], d["ok"], d["errors"]) == ("closed", 8, 8, {})
    assert 0 < d["compute_saved"] < 1
    assert set(d["by_budget"]) <= {"capacity=1", "capacity=0.25"}
    assert d["latency_ms"]["p50"] <= d["latency_ms"]["p99"]

    opened = ["bench", str(image_path), "--rate", "20", "--duration", "0.5", "--mix", "latency_ms=100"]
    code, out = run_cli(capsys, "--url", server_url, *opened)
    assert code == 0
    assert "open loop" in out
    assert "deadlines met" in out
    assert "throughput" in out


def test_cli_gif_clip_routing_and_env_url(
    server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MONE_URL", server_url)  # no --url: the environment names the server
    gif = ROOT / "clients" / "web" / "samples" / "sweep.gif"
    code, out = run_cli(
        capsys, "classify", str(gif), "--kind", "clip", "--routing", "--out", str(tmp_path), "--json"
    )
    record = json.loads(out)
    assert code == 0
    routing_map = Image.open(record["routing_png"])
    assert routing_map.size == (4 * 228 - 4, 2 * 228 + 24)  # 8 frames: 2 rows of 4 tiles (224 + gap), legend
