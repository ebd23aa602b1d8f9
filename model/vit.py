"""Mixture of Nested Experts ViT for images and clips (Jain et al., NeurIPS 2024, arXiv 2407.19985).

A pre-LN ViT (Dosovitskiy et al. 2021) with global average pooling whose spatial layers are shared by E nested
experts of width D/2**(E-i).  One router at the first layer assigns every token to an expert with Expert
Preferred Routing; every layer reuses that assignment.  Clips go through a ViViT factorised encoder (Arnab et
al. 2021): the MoNE spatial transformer per frame, then a full-capacity temporal transformer over the pooled
frame tokens.  An image is a one-frame clip, so one set of weights serves both.

Read top to bottom, in the paper's order:

1. `MoNEConfig` (model/config.py): width D, depth, heads, and the expert widths d_1 < ... < d_E = D.
2. `NestedLinear`: a linear layer whose first d_j input or output features are expert j's (Eq. 4-6).
3. `Block`: pre-LN attention and MLP built of nested linears.  Tokens of every width attend to each other at
   full width D; each token's MLP output is scaled by alpha*r + 1, r its router probability (Eq. 1).
4. The router and Expert Preferred Routing (model/routing.py; Sec. 4.1-4.2, Algorithm 1), run once on the
   embedded tokens, and the one permutation that puts each expert's tokens into one block of rows.
5. `MoNE`: patch embedding, routing, the layers, average pooling, the temporal encoder of clips, the head.

This is the forward that training runs (out of place, for autograd), and the one the fast forward is tested
against.  Without autograd, `MoNE.encode_frames` and `Block.forward` hand over to model/inference.py: the same
function, in place and with fewer operations (runs of experts at one width with masks, a per-frame Q/K/V
buffer, chunks of frames; its docstring explains them).

Shape legend: B batch, T frames, F = B*T frames, N tokens per frame, D width, E experts, H heads, h head
width, k_j tokens of expert j in one frame, d_j width of expert j.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model import inference
from mone.model.capacity import check_capacity, expert_counts, realised_capacity
from mone.model.config import MoNEConfig
from mone.model.flops import sample_gflops
from mone.model.routing import Layout, Router, expert_preferred_routing, group_tokens


class NestedLinear(nn.Linear):
    """A linear layer shared by the nested experts: expert j owns its first d_j input or output features.

    With W of shape (out, in), an expert's weights are views of W, never copies:

    - an in-projection (Q/K/V, fc1) takes a token's first d_j features through the first d_j columns and
      gives every output, x[:, :d_j] @ W[:, :d_j]^T + b (`nested_in`, Eq. 4);
    - an out-projection (attention output, fc2) takes every input feature and gives only the first d_j
      outputs, x @ W[:d_j]^T + b[:d_j]; the residual stream's features beyond d_j get nothing (`nested_out`,
      Eq. 5-6).

    At d_j = D both are the plain `nn.Linear`, whose parameters (weight, bias) it keeps.
    """

    def nested_in(self, x: Tensor, d: int) -> Tensor:
        """(M, in) -> (M, out) through the first d input features."""
        return F.linear(x[:, :d], self.weight[:, :d], self.bias)

    def nested_out(self, x: Tensor, d: int) -> Tensor:
        """(M, in) -> (M, d): the first d outputs."""
        return F.linear(x, self.weight[:d], self.bias[:d])


class Block(nn.Module):
    """Pre-LN transformer block of nested linears (the paper's Fig. 2a).

    Parameter names follow timm's ViT `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), so that
    timm checkpoints map one to one: `attn` and `mlp` are plain module dicts of those names, reached as
    `qkv`, `proj`, `fc1` and `fc2`.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": NestedLinear(dim, 3 * dim), "proj": NestedLinear(dim, dim)})
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = mlp_ratio * dim
        self.mlp = nn.ModuleDict({"fc1": NestedLinear(dim, hidden), "fc2": NestedLinear(hidden, dim)})

    @property
    def qkv(self) -> NestedLinear:
        """Attention in-projection, D -> 3D."""
        return cast(NestedLinear, self.attn["qkv"])

    @property
    def proj(self) -> NestedLinear:
        """Attention out-projection, D -> D."""
        return cast(NestedLinear, self.attn["proj"])

    @property
    def fc1(self) -> NestedLinear:
        """MLP in-projection, D -> mlp_ratio*D."""
        return cast(NestedLinear, self.mlp["fc1"])

    @property
    def fc2(self) -> NestedLinear:
        """MLP out-projection, mlp_ratio*D -> D."""
        return cast(NestedLinear, self.mlp["fc2"])

    def forward(self, x: Tensor) -> Tensor:
        """Dense block on (B, L, D), every token at full width: the temporal transformer."""
        if not torch.is_grad_enabled():
            return inference.forward_dense(self, x)
        B, L, D = x.shape
        return self.forward_nested(x.reshape(B * L, D), Layout(B, (L,), (D,)), None).view(B, L, D)

    def forward_nested(self, x: Tensor, layout: Layout, scale: Tensor | None) -> Tensor:
        """The block over tokens grouped by expert, out of place (for autograd).

        Every token attends to its frame at full width (`attention`).  Then each expert's tokens go through
        the out-projection and the MLP at their width d_j, whose outputs fill the first d_j features of the
        residual stream and leave the rest (Eq. 5-6), and the MLP output is scaled by alpha*r + 1 (Eq. 1).

        Args:
            x: (F*N, D) residual stream in `layout` order.
            layout: the groups, one per expert.
            scale: (F*N, 1) MLP multiplier alpha*r+1 of each token (Eq. 1), or None for 1.
        """
        D = x.shape[-1]
        a = self.attention(x, layout)
        out = []
        for s, e, d in layout.segments():
            xs = x[s:e] + F.pad(self.proj.nested_out(a[s:e], d), (0, D - d))
            y = self.fc2.nested_out(F.gelu(self.fc1.nested_in(self.norm2(xs), d)), d)
            out.append(xs + F.pad(y if scale is None else y * scale[s:e], (0, D - d)))
        return out[0] if len(out) == 1 else torch.cat(out)

    def attention(self, x: Tensor, layout: Layout) -> Tensor:
        """Self-attention over all tokens of each frame at full width, (F*N, D) in `layout` order.

        Each expert's Q, K, V come from its nested in-projection of LN(x) (Eq. 4), so that tokens of every
        width meet in one D-wide attention; LayerNorm runs over the full D-wide residual stream.
        """
        D, H = x.shape[-1], self.heads
        h = self.norm1(x)
        parts = [self.qkv.nested_in(h[s:e], d) for s, e, d in layout.segments()]
        qkv = parts[0] if len(parts) == 1 else torch.cat(parts)
        if layout.to_frames is not None:  # attention needs each frame's tokens together
            qkv = qkv.index_select(0, layout.to_frames)
        q, k, v = qkv.view(layout.frames, -1, 3, H, D // H).unbind(2)  # (F, N, H, h) each
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(-1, D)  # (F*N, D) frame order
        return a if layout.to_groups is None else a.index_select(0, layout.to_groups)


@dataclass
class MoNEOutput:
    """What one forward pass produced and spent, per sample.

    Attributes:
        logits: (B, num_classes).
        capacity: (B,) realised effective capacity after flooring token counts.
        requested: (B,) effective capacity asked for.
        expert_counts: (B, E) tokens per expert in each frame, smallest expert first.
        experts: (B, T, N) int8 expert index of each patch (row-major patch grid), 0 = smallest expert.
        gflops: (B,) analytic GFLOPs of this sample's forward (multiply-add = 2 FLOPs).
    """

    logits: Tensor
    capacity: Tensor
    requested: Tensor
    expert_counts: Tensor
    experts: Tensor
    gflops: Tensor


class MoNE(nn.Module):
    """MoNE ViT / factorised-encoder ViViT.

    Args:
        cfg: the architecture.

    Call as ``net(x, capacity)`` with x (B, C, H, W) images or (B, T, C, H, W) clips, normalised with
    ``cfg.mean``/``cfg.std``, and capacity a float or a (B,) tensor of effective capacities in [1/8, 1].
    """

    def __init__(self, cfg: MoNEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        self.router = Router(D, cfg.num_experts)
        # Eq. 1's alpha: one learnable scalar for all layers, starting at 0, clamped to [0, 1) (`mlp_alpha`).
        self.alpha = nn.Parameter(torch.zeros(()))
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        if cfg.temporal_depth:
            self.temporal_pos = nn.Parameter(torch.zeros(1, cfg.num_frames, D))
            self.temporal_blocks = nn.ModuleList(
                Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.temporal_depth)
            )
            self.temporal_norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)
        # Inference only (model/inference.py): what one more matrix product costs, in token rows of
        # full-width work (`inference.plan_runs`), and d_j per expert on the model's device for the masks of
        # runs of experts (no copy from the host inside a forward: CUDA graphs).
        self.full_width_rows = inference.FULL_WIDTH_ROWS
        self.expert_widths: Tensor
        self.register_buffer("expert_widths", torch.tensor(cfg.expert_dims), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = self.cfg.in_chans * self.cfg.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)  # type: ignore[arg-type]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.temporal_depth:
            nn.init.trunc_normal_(self.temporal_pos, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.alpha)

    def mlp_alpha(self) -> Tensor:
        """alpha clamped to [0, 1) with a straight-through gradient: a plain clamp would stop learning for
        good once an update pushed the raw value below 0 (where it starts)."""
        a = self.alpha
        return a + (a.clamp(0.0, 1.0 - 1e-6) - a).detach()

    # -- spatial MoNE encoder ------------------------------------------------------------------------
    def embed(self, frames: Tensor) -> Tensor:
        x: Tensor = self.patch_embed(frames)  # (F, D, g, g)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (F, N, D)

    def encode_frames(self, x: Tensor, counts: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """MoNE spatial transformer for frames that share one token split.

        The router runs once, on the embedded tokens; every layer reuses its assignment and its probability
        r of each token's expert, which scales the token's MLP output by alpha*r + 1 (Eq. 1).  The tokens are
        then permuted once into one block of rows per expert, largest first, for every layer.

        Args:
            x: (F, N, D) embedded tokens.
            counts: k_1..k_E.

        Returns:
            pooled (F, D) average of the final tokens, and the (F, N) expert of each token.
        """
        F_, N, D = x.shape
        E = self.cfg.num_experts
        probs = self.router(x)  # (F, N, E), once, before the first layer
        experts = expert_preferred_routing(probs, counts)  # (F, N), Algorithm 1
        alpha = self.mlp_alpha()
        # Eq. 1: every layer scales a token's MLP output by alpha*r + 1, r the probability of its own expert.
        scale = (alpha * probs.gather(-1, experts.unsqueeze(-1)) + 1.0).view(F_ * N, 1)
        if not torch.is_grad_enabled():  # the same function, in place and faster
            return inference.encode_frames_(self, x, experts, counts, scale), experts
        # One group per expert in use, largest first.
        groups = tuple((j,) for j in range(E - 1, -1, -1) if counts[j] > 0)
        ks = tuple(counts[j] for (j,) in groups)
        dims = tuple(self.cfg.expert_dims[j] for (j,) in groups)
        rows, layout = group_tokens(experts, E, groups, ks, dims)
        x = x.reshape(F_ * N, D)
        if rows is not None:
            x, scale = x.index_select(0, rows), scale.index_select(0, rows)
        for blk in self.blocks:
            x = cast(Block, blk).forward_nested(x, layout, scale)
        if layout.to_frames is not None:
            x = x.index_select(0, layout.to_frames)
        return x.view(F_, N, D).mean(dim=1), experts  # global average pooling, no un-permute needed

    # -- full model ------------------------------------------------------------------------------------
    def forward_features(
        self, clips: Tensor, capacities: list[float], splits: Sequence[tuple[int, ...]] | None = None
    ) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
        """Pooled clip features (B, D), the (B, T, N) expert map and per-sample token splits (`splits` when
        given, else those of `capacities`)."""
        B, T = clips.shape[:2]
        N, E = self.cfg.num_tokens, self.cfg.num_experts
        tokens = self.embed(clips.flatten(0, 1))  # (F, N, D)
        per_sample = list(splits) if splits is not None else [expert_counts(c, N, E) for c in capacities]
        per_frame = [c for c in per_sample for _ in range(T)]
        pooled = tokens.new_empty(B * T, tokens.shape[-1])
        experts = torch.empty(B * T, N, dtype=torch.int8, device=tokens.device)
        for counts in dict.fromkeys(per_frame):  # frames that share a token split run together
            idx = [i for i, c in enumerate(per_frame) if c == counts]
            if len(idx) == len(per_frame):
                pooled, expert_map = self.encode_frames(tokens, counts)
                experts.copy_(expert_map)
                break
            index = torch.tensor(idx, device=tokens.device)
            p, expert_map = self.encode_frames(tokens.index_select(0, index), counts)
            pooled = pooled.index_copy(0, index, p)
            experts[index] = expert_map.to(torch.int8)
        z = self.fc_norm(pooled).view(B, T, -1)
        if self.cfg.temporal_depth:  # the factorised encoder's temporal transformer, at full capacity
            z = z + self.temporal_pos[:, :T]
            for blk in self.temporal_blocks:
                z = blk(z)
            z = self.temporal_norm(z)
        return z.mean(dim=1), experts.view(B, T, N), per_sample

    def forward_head(self, features: Tensor) -> Tensor:
        return cast(Tensor, self.head(features))

    def forward(
        self,
        x: Tensor,
        capacity: float | Sequence[float] | Tensor = 1.0,
        splits: Sequence[tuple[int, ...]] | None = None,
    ) -> MoNEOutput:
        """Classify x at `capacity`; or, with `splits` (one token split k_1..k_E per sample, as
        `expert_counts` gives them), at those splits as they are, and `capacity` is not used."""
        cfg = self.cfg
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = f"a tensor of {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating-point tensor, got {kind}")
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5:
            raise ValueError(
                f"expected (B, C, H, W) images or (B, T, C, H, W) clips, got shape {tuple(x.shape)}"
            )
        B, T, C, Hh, Ww = x.shape
        if (C, Hh, Ww) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(
                f"expected frames of shape ({cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                f"got {(C, Hh, Ww)}"
            )
        if B == 0:
            raise ValueError("empty batch: x has no samples")
        if T == 0:
            raise ValueError("a clip needs at least one frame, got 0")
        if cfg.temporal_depth and cfg.num_frames < T:
            raise ValueError(f"clip has {T} frames, the model takes at most {cfg.num_frames}")
        if splits is not None:
            splits = _check_splits(splits, B, cfg.num_tokens, cfg.num_experts)
            capacities = [realised_capacity(s) for s in splits]
        else:
            capacities = _as_capacities(capacity, B, cfg.num_experts)
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        features, experts, splits = self.forward_features(x, capacities, splits)
        logits = self.forward_head(features)
        f64 = torch.float64
        return MoNEOutput(
            logits=logits,
            capacity=torch.tensor([realised_capacity(s) for s in splits], dtype=f64),
            requested=torch.tensor(capacities, dtype=f64),
            expert_counts=torch.tensor(splits, dtype=torch.long),
            experts=experts,
            gflops=torch.tensor([sample_gflops(cfg, s, T) for s in splits], dtype=f64),
        )


def _check_splits(
    splits: Sequence[tuple[int, ...]], batch: int, num_tokens: int, num_experts: int
) -> list[tuple[int, ...]]:
    """The token splits as tuples, or ValueError unless there is one per sample, each of `num_experts`
    non-negative counts that sum to `num_tokens`."""
    out = [tuple(int(k) for k in s) for s in splits]
    if len(out) != batch:
        raise ValueError(f"{len(out)} token splits for a batch of {batch}")
    for s in out:
        if len(s) != num_experts or min(s) < 0 or sum(s) != num_tokens:
            raise ValueError(f"a token split is {num_experts} counts >= 0 that sum to {num_tokens}, got {s}")
    return out


def _as_capacities(capacity: float | Sequence[float] | Tensor, batch: int, num_experts: int) -> list[float]:
    if capacity is None or isinstance(capacity, str | bytes | bool):
        raise ValueError(
            f"capacity must be a number, a sequence of numbers or a tensor, got {type(capacity).__name__} "
            f"{capacity!r:.40}"
        )
    if isinstance(capacity, Tensor):
        if capacity.dtype == torch.bool or capacity.is_complex():
            raise ValueError(f"capacity tensor must hold real numbers, got dtype {capacity.dtype}")
        if capacity.dim() == 0:
            values: list[object] = [capacity.item()] * batch
        elif capacity.shape == (batch,):
            values = list(capacity.tolist())
        else:
            raise ValueError(
                f"capacity tensor must be a scalar or have shape ({batch},), got {capacity.shape}"
            )
    elif isinstance(capacity, numbers.Real):
        values = [capacity] * batch
    elif getattr(capacity, "ndim", None) == 0 and hasattr(capacity, "item"):  # a 0-d numpy array
        values = [capacity.item()] * batch
    elif isinstance(capacity, Sequence) or hasattr(capacity, "__array__"):  # a list, tuple or numpy array
        values = list(cast(Sequence[object], capacity))
        if len(values) != batch:
            raise ValueError(f"got {len(values)} capacities for a batch of {batch}")
    else:
        raise ValueError(
            f"capacity must be a number, a sequence of numbers or a tensor, got {type(capacity).__name__}"
        )
    return [check_capacity(c, num_experts) for c in values]  # type: ignore[arg-type]
