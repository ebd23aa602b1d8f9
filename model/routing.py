"""Router and Expert Preferred Routing (MoNE Sec. 4.1-4.2, Algorithm 1).

Shape legend: F frames (a batch of images is a batch of one-frame clips), N tokens per frame, D width,
E experts.  Expert indices run 0..E-1, smallest expert first (0 is the D/2**(E-1) expert, E-1 the full model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Router(nn.Module):
    """One linear layer + softmax over experts, run once on the tokens entering the first layer.

    Its input is the patch + position embedding without a LayerNorm (the paper leaves this open;
    docs/model.md sections 2 and 6).  Its probabilities also scale every layer's MLP output (Eq. 1).

    Args:
        dim: token width D.
        num_experts: E.
    """

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.proj(x)
        return logits.softmax(dim=-1)  # (F, N, E)


def expert_preferred_routing(probs: Tensor, counts: tuple[int, ...]) -> Tensor:
    """Algorithm 1: the largest expert picks its top-k_E tokens by its own probability column, then the next
    largest picks among the rest, and so on; tokens nobody picked stay on the smallest expert.

    Args:
        probs: router probabilities (F, N, E).
        counts: tokens per expert k_1..k_E (smallest expert first), summing to N.

    Returns:
        (F, N) int64 expert index per token.
    """
    F_, N, E = probs.shape
    if len(counts) != E or sum(counts) != N:
        raise ValueError(f"counts {counts} do not split {N} tokens over {E} experts")
    experts = torch.zeros(F_, N, dtype=torch.long, device=probs.device)
    for j, k in enumerate(counts):
        if k == N:  # one expert takes every token: nothing to choose
            return experts.fill_(j)
    taken = torch.zeros(F_, N, dtype=torch.bool, device=probs.device)
    for j in range(E - 1, 0, -1):
        k = counts[j]
        if k == 0:
            continue
        # -inf rather than 0 for taken tokens: a probability can underflow to 0 and tie with them.
        scores = probs[..., j].masked_fill(taken, float("-inf"))
        idx = scores.topk(k, dim=1, sorted=False).indices  # (F, k)
        experts.scatter_(1, idx, j)
        taken.scatter_(1, idx, True)
    return experts
