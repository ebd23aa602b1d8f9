"""ToMe over dense MoNE weights (model/tome.py) and the random-router ablation (model/evaluate.py)."""

from __future__ import annotations

import pytest
import torch

from mone.model import MoNE, MoNEConfig, gflops
from mone.model.evaluate import random_router
from mone.model.tome import bipartite_merge, tome_forward, tome_gflops, tome_tokens

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def net() -> MoNE:
    torch.manual_seed(0)
    m = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10)).eval()
    with torch.no_grad():
        m.alpha.fill_(0.3)  # exercise the router scale, which ToMe must reproduce
        m.head.weight.normal_(std=0.1)
    return m


def test_r0_equals_dense_forward(net: MoNE) -> None:
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        dense = net(x, 1.0).logits
    torch.testing.assert_close(tome_forward(net, x, 0), dense, rtol=1e-4, atol=1e-5)
    clips = torch.randn(2, 4, 1, 28, 28)
    with torch.no_grad():
        dense_clips = net(clips, 1.0).logits
    torch.testing.assert_close(tome_forward(net, clips, 0), dense_clips, rtol=1e-4, atol=1e-5)


def test_merging_runs_and_changes_output(net: MoNE) -> None:
    x = torch.randn(2, 1, 28, 28)
    out = tome_forward(net, x, 8)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, tome_forward(net, x, 0))


def test_merge_conserves_size_and_mass() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g)
    size = torch.ones(2, 9, 1)
    merged, new_size = bipartite_merge(x, size, torch.randn(2, 9, 3, generator=g), r=3)
    assert merged.shape == (2, 6, 5)
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close((merged * new_size).sum(dim=1), x.sum(dim=1))


def test_gflops() -> None:
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10)
    assert tome_gflops(cfg, 0) == pytest.approx(gflops(cfg, 1.0))
    assert tome_gflops(cfg, 0, frames=8) == pytest.approx(gflops(cfg, 1.0, frames=8))
    assert tome_tokens(cfg, 8) == [49, 41, 33, 25, 17, 9, 5]
    values = [tome_gflops(cfg, r) for r in range(0, 14, 2)]
    assert values == sorted(values, reverse=True)


def test_random_router_is_seeded_and_restored(net: MoNE) -> None:
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        learned = net(x, 0.5).experts
        with random_router(net):
            r1 = net(x, 0.5).experts
        with random_router(net):
            r2 = net(x, 0.5).experts
        again = net(x, 0.5).experts
    assert torch.equal(r1, r2)
    assert not torch.equal(r1, learned)
    assert torch.equal(again, learned)
