"""The GPU paths on a real CUDA device: captured forwards, bf16 / fp16 and the runner (skipped without CUDA;
scripts/gpu-bench.sh runs them first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mone.model import MoNE, MoNEConfig, load_checkpoint
from mone.server.core.capture import CapturedForward, CudaGraphs, capture_sizes
from mone.server.core.precision import ROUTED_TOLERANCE, cast_model
from mone.server.core.runner import Runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "default"


def model(variant: str = "S/16", dtype: torch.dtype = torch.float32) -> MoNE:
    torch.manual_seed(0)
    net = MoNE(MoNEConfig.from_variant(variant, num_classes=10)).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    return cast_model(net.to(CUDA), dtype)


@pytest.mark.parametrize("caps", [[1.0] * 3, [0.5] * 8, [0.25, 1.0, 0.5, 0.125, 1.0]], ids=str)
def test_cuda_graphs_answer_as_the_eager_forward(caps: list[float]) -> None:
    net = model()
    cf = CapturedForward(net, CudaGraphs(CUDA), capture_sizes(8))
    cfg = net.cfg
    for seed in (0, 1):  # the second batch replays the graphs captured for the first
        torch.manual_seed(seed)
        x = torch.randn(len(caps), 1, 3, cfg.img_size, cfg.img_size, device=CUDA)
        with torch.inference_mode():
            logits, experts, _ = cf(x, caps)
            ref = net(x, capacity=caps)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-3, atol=1e-3)
        assert (experts == ref.experts).float().mean().item() > 0.99, seed
    assert cf.captures + len(cf.failed) >= 1


@pytest.mark.parametrize(
    "caps",
    [
        [1.0] * 3,
        [0.125] * 4,
        [0.5] * 8,
        [0.25, 1.0, 0.5],
    ],
    ids=str,
)
def test_every_split_is_captured_and_replayed(caps: list[float]) -> None:
    net = model()
    cf = CapturedForward(net, CudaGraphs(CUDA), capture_sizes(8))
    x = torch.randn(len(caps), 1, 3, net.cfg.img_size, net.cfg.img_size, device=CUDA)
    with torch.inference_mode():
        cf(x, caps)
        cf(x, caps)
    assert not cf.failed
    assert cf.eager == 0
    assert cf.replays == 2 * cf.captures


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_runner_on_cuda_within_tolerance_of_the_cpu(dtype: str) -> None:
    cpu = Runner(load_checkpoint(SHIPPED), torch.device("cpu"))
    gpu = Runner(load_checkpoint(SHIPPED), CUDA, dtype=dtype, cuda_graphs=True, max_batch=8)
    assert gpu.graphs is not None
    torch.manual_seed(0)
    xs = [torch.randn(1, 1, 28, 28) for _ in range(6)]
    for c in (1.0, 0.5, 0.25):
        a = cpu.run(xs, [c] * 6, [1] * 6, [False] * 6)
        b = gpu.run(xs, [c] * 6, [1] * 6, [False] * 6)
        ref = torch.tensor([s.logits for s in a.samples])
        low = torch.tensor([s.logits for s in b.samples])
        rel = (low - ref).abs().amax(-1) / ref.abs().amax(-1)
        assert rel.max().item() <= ROUTED_TOLERANCE[gpu.dtype], (c, rel)
        assert [s.counts for s in a.samples] == [s.counts for s in b.samples]
    assert gpu.graphs.replays > 0  # capacity 1.0 at least replays a graph
