"""The inference dtype (server/core/precision.py): bf16 on the CPU against fp32, through the runner's
forward."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mone.model import MoNE, MoNEConfig, load_checkpoint
from mone.model.checkpoint import Checkpoint
from mone.model.preprocess import pil_to_tensor
from mone.server.config import Settings
from mone.server.core.budget import Budget
from mone.server.core.precision import LOGIT_TOLERANCE, ROUTED_TOLERANCE, cast_model, resolve_dtype
from mone.server.core.request import InferRequest
from mone.server.core.runner import Runner
from mone.server.http.app import create_app
from tests.support.media import fashion_images
from tests.support.models import fast_settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "clients" / "web" / "samples"
SHIPPED = ROOT / "checkpoints" / "default"
CAPACITIES = (1.0, 0.5, 0.25)
CPU = torch.device("cpu")


def shipped_inputs(ck: Checkpoint) -> list[torch.Tensor]:
    pics = [Image.open(p) for p in sorted(SAMPLES.glob("*.png"))]
    pics += [Image.fromarray(a) for a in fashion_images(12)]
    return [pil_to_tensor(p, ck.config).unsqueeze(0) for p in pics]  # (T=1, C, H, W) each


def logits_of(runner: Runner, xs: list[torch.Tensor], capacity: float) -> tuple[torch.Tensor, list[float]]:
    batch = [InferRequest(x, "image", Budget("capacity", capacity), top_k=1) for x in xs]
    out = runner.run(batch, [runner.token_split(capacity)] * len(xs))
    return torch.tensor([s.logits for s in out.samples]), [s.realised for s in out.samples]


def check_within_tolerance(low: torch.Tensor, ref: torch.Tensor, capacity: float, dtype: torch.dtype) -> None:
    """Each sample's logits within the dtype's tolerance of fp32, relative to its largest |fp32 logit|: every
    sample within LOGIT_TOLERANCE at capacity 1.0 (no routing choice); below it every sample within
    ROUTED_TOLERANCE and most within LOGIT_TOLERANCE.  A top-1 that differs is a near-tie in fp32 too."""
    low = low.float()
    err = (low - ref).abs().amax(-1)
    rel = err / ref.abs().amax(-1)
    assert rel.max().item() > 0  # low precision did run
    if capacity == 1.0:
        assert rel.max().item() <= LOGIT_TOLERANCE[dtype], rel
    else:
        assert rel.max().item() <= ROUTED_TOLERANCE[dtype], rel
        assert (rel <= LOGIT_TOLERANCE[dtype]).float().mean().item() >= 0.5, rel
    top = ref.topk(2, dim=-1).values
    moved = low.argmax(-1) != ref.argmax(-1)
    assert (top[moved, 0] - top[moved, 1] <= 2 * err[moved]).all(), (capacity, moved)


def runners(ck_path: Path, *, dtype: str) -> Runner:
    ck = load_checkpoint(ck_path)
    return Runner(ck, CPU, dtype=dtype)


def test_dtype_names_and_devices() -> None:
    assert resolve_dtype("fp32", CPU) is torch.float32
    assert resolve_dtype("bf16", CPU) is torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="one of"):
        resolve_dtype("fp8", CPU)
    with pytest.raises(ValueError, match="fp16"):
        Settings(inference_dtype="fp16", device="cpu")
    assert Settings().inference_dtype == "fp32"


def test_fp32_leaves_the_model_as_loaded() -> None:
    ck = load_checkpoint(SHIPPED)
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    runner = Runner(ck, CPU)
    assert runner.dtype is torch.float32
    assert all(torch.equal(before[k], v) for k, v in runner.model.state_dict().items())
    assert not runner.model._forward_pre_hooks  # no input hook on the default path
    assert runner.graphs is None  # nothing is captured on the CPU


@pytest.mark.parametrize("full_width_rows", [0.0, math.inf], ids=["per-expert", "full-width"])
def test_bf16_stays_within_tolerance_of_fp32_on_the_shipped_checkpoint(full_width_rows: float) -> None:
    fp32, bf16 = runners(SHIPPED, dtype="fp32"), runners(SHIPPED, dtype="bf16")
    assert all(p.dtype is torch.bfloat16 for p in bf16.model.parameters())
    for r in (fp32, bf16):
        r.model.full_width_rows = full_width_rows  # both ways of running a multi-expert split
    xs = shipped_inputs(fp32.checkpoint)
    for c in CAPACITIES:
        ref, ref_caps = logits_of(fp32, xs, c)
        low, low_caps = logits_of(bf16, xs, c)
        assert low_caps == ref_caps  # the same token split is served
        check_within_tolerance(low, ref, c, torch.bfloat16)


def test_bf16_within_tolerance_for_a_wider_model_with_clips() -> None:
    """A 12-layer model with 64 tokens per frame and a temporal transformer, images and 4-frame clips."""
    torch.manual_seed(1)
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10, depth=12, img_size=32, num_frames=4)
    net = MoNE(cfg).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    ref_net = copy.deepcopy(net)
    low_net = cast_model(net, torch.bfloat16)
    torch.manual_seed(2)
    for shape in ((6, 1, 32, 32), (3, 4, 1, 32, 32)):
        x = torch.randn(shape)
        for c in CAPACITIES:
            with torch.inference_mode():
                ref, low = ref_net(x, c), low_net(x, c)
            assert low.logits.dtype is torch.bfloat16
            assert torch.equal(low.expert_counts, ref.expert_counts)
            check_within_tolerance(low.logits, ref.logits, c, torch.bfloat16)


def test_cast_model_casts_inputs_once_registered() -> None:
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10)).eval()
    cast_model(net, torch.bfloat16)
    cast_model(net, torch.bfloat16)
    assert len(net._forward_pre_hooks) == 1
    with torch.inference_mode():
        out = net(torch.randn(2, 1, 28, 28))  # fp32 input: cast on entry
    assert out.logits.dtype is torch.bfloat16


@pytest.mark.anyio
async def test_metadata_reports_the_dtype_and_bf16_serves(checkpoint_dir: Path) -> None:
    import httpx

    from tests.support.media import png

    image = png(fashion_images(1)[0])
    for dtype in ("bf16", "fp32"):
        app = create_app(fast_settings(checkpoint_dir, inference_dtype=dtype))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                info = (await client.get("/v1/models/mone")).json()
                r = await client.post(
                    "/v1/classify", files={"file": ("x.png", image, "image/png")}, data={"capacity": "0.5"}
                )
        assert info["checkpoint"]["dtype"] == dtype
        assert info["checkpoint"]["cuda_graphs"] is False
        assert r.status_code == 200, r.text
        assert r.json()["served"]["capacity"] == pytest.approx(0.5, abs=0.02)
