"""Router, Expert Preferred Routing (MoNE Sec. 4.1-4.2, Algorithm 1) and the grouping of tokens by expert.

The router runs once, on the tokens entering the first layer; every layer reuses its assignment.  The tokens
are then permuted once so that each expert's tokens form one block of rows (`group_tokens`).

Shape legend: F frames (a batch of images is a batch of one-frame clips), N tokens per frame, D width,
E experts.  Expert indices run 0..E-1, smallest expert first (0 is the D/2**(E-1) expert, E-1 the full model).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Layout:
    """How the tokens of F frames sit in one (F*N, D) matrix after `group_tokens`: in groups of experts,
    largest expert first, frame-major inside a group.  Each group is a contiguous block of rows for every
    layer's matrix products, all at the group's width.

    Training has one group per expert in use.  At inference a group may hold several adjacent experts
    (model/inference.py, `RunLayout`).

    Attributes:
        frames: F.
        ks: tokens per frame of each group.
        dims: width d_j of each group.
        to_frames: (F*N,) rows that put the matrix in frame order for attention; None if already so.
        to_groups: the inverse of `to_frames`.
    """

    frames: int
    ks: tuple[int, ...]
    dims: tuple[int, ...]
    to_frames: Tensor | None = None
    to_groups: Tensor | None = None

    def segments(self) -> list[tuple[int, int, int]]:
        """(first row, end row, width) of each group."""
        out, start = [], 0
        for k, d in zip(self.ks, self.dims, strict=True):
            out.append((start, start + self.frames * k, d))
            start += self.frames * k
        return out


def group_tokens(
    experts: Tensor,
    num_experts: int,
    groups: tuple[tuple[int, ...], ...],
    ks: tuple[int, ...],
    dims: tuple[int, ...],
) -> tuple[Tensor | None, Layout]:
    """Permute once: the rows that put every group's tokens, of all frames, into one block, largest first.

    Every layer then runs one matrix product per group on a contiguous block of rows, with no gather or
    scatter per layer; only attention, which needs each frame's tokens together, goes through the layout's
    `to_frames` and back through `to_groups`.

    Args:
        experts: (F, N) expert of each token.
        num_experts: E.
        groups: the experts of each group, largest first; an expert inside a group but unused has no tokens.
        ks: tokens per frame of each group.
        dims: width of each group.

    Returns:
        (F*N,) rows of the token matrix in group order, or None for one group (the matrix stays in frame
        order); and the layout.
    """
    F_, N = experts.shape
    if len(groups) == 1:
        return None, Layout(F_, ks, dims)
    group_of = torch.empty(num_experts, dtype=torch.long, device=experts.device)
    for i, g in enumerate(groups):
        group_of[min(g) : max(g) + 1] = i
    perm = torch.argsort(group_of[experts], dim=1, stable=True)  # (F, N), first group (largest) first
    flat = perm + N * torch.arange(F_, device=experts.device).unsqueeze(1)
    starts = [sum(ks[:g]) for g in range(len(ks))]
    rows = torch.cat([flat[:, s : s + k].reshape(-1) for s, k in zip(starts, ks, strict=True)])
    if F_ == 1:  # one frame: attention does not depend on the order of its tokens
        return rows, Layout(F_, ks, dims)
    to_frames = torch.argsort(rows // N, stable=True)
    to_groups = torch.empty_like(to_frames)
    to_groups[to_frames] = torch.arange(len(rows), device=experts.device)
    return rows, Layout(F_, ks, dims, to_frames, to_groups)
