from __future__ import annotations

import pytest
import torch

from mone.model import MoNE, MoNEConfig


def make_net(variant: str = "Mi/4", alpha: float = 0.3, seed: int = 0, **overrides: object) -> MoNE:
    """A randomly initialised model whose head and alpha are non-zero, so that logits depend on everything."""
    torch.manual_seed(seed)
    overrides.setdefault("num_classes", 10)
    net = MoNE(MoNEConfig.from_variant(variant, **overrides))  # type: ignore[arg-type]
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=0.5)
        net.alpha.fill_(alpha)
        # A larger router spread than the init: router probabilities (and the MLP scale) differ per token.
        net.router.proj.weight.normal_(std=0.5)
    return net.eval()


@pytest.fixture
def net() -> MoNE:
    return make_net()
