"""Mixture of Nested Experts ViT for images and clips (Jain et al., NeurIPS 2024, arXiv 2407.19985).

A pre-LN ViT (Dosovitskiy et al. 2021) with global average pooling whose spatial layers are shared by E nested
experts of width D/2**(E-i).  One router at the first layer assigns every token to an expert with Expert
Preferred Routing; every layer reuses that assignment.  Clips go through a ViViT factorised encoder (Arnab et
al. 2021): the MoNE spatial transformer per frame, then a full-capacity temporal transformer over the pooled
frame tokens.  An image is a one-frame clip, so one set of weights serves both.

Fast path: tokens are permuted once after routing so that each expert's tokens form one dense (F*k_j, D)
matrix; every layer then runs one matrix product per expert on contiguous weight slices (no per-layer
gather/scatter).  At inference, where one product per expert costs more than it saves (a few images of a
small model), adjacent experts share one product with masks for their narrower tokens, up to the whole layer
at full width (`MoNE.plan_runs`).  Attention needs each frame's tokens together: training permutes the
Q/K/V rows into frame order and back in every layer (`Block.attention`); inference runs each block a few
frames at a time and copies the chunk's Q/K/V into a per-frame buffer (`Block._forward_inference_`).

Shape legend: B batch, T frames, F = B*T frames, N tokens per frame, D width, E experts, H heads, h head
width, k_j tokens of expert j in one frame, d_j width of expert j.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model.capacity import check_capacity, expert_counts, realised_capacity
from mone.model.config import MoNEConfig
from mone.model.flops import sample_gflops
from mone.model.routing import Router, expert_preferred_routing


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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


# Bytes of MLP hidden per chunk of frames at inference on the CPU (`Block._forward_inference_`); of 4, 8, 16
# and 32 MiB, 16 was fastest for S/16 at batch 32 on a 2-core Zen 3 with 32 MiB of L3.  On a GPU one chunk
# holds every frame.
CHUNK_BYTES = 16 << 20

# Default of `MoNE.full_width_rows` (CPU): what one more product costs, in token rows of full-width work
# (`MoNE.plan_runs`); measured on 2 vCPUs it is 15-90 for Mi/4 and under 16 for S/16, whose rows cost more.
# `calibrate_full_width` measures it per model and device.
FULL_WIDTH_ROWS = 32.0


@dataclass(frozen=True)
class Layout:
    """How the tokens of F frames sit in one (F*N, D) matrix: grouped by expert, largest expert first,
    frame-major inside a group.  Each group is a contiguous block of rows for every layer's matrix products.

    At inference a group may hold the tokens of several adjacent experts (`MoNE.plan_runs`): it runs at the
    largest of their widths, and `masks` zero what lies beyond each token's own width.

    Attributes:
        frames: F.
        ks: tokens per frame of each group.
        dims: width d_j of each group.
        to_frames: (F*N,) rows that put the matrix in frame order for attention; None if already so.
        to_groups: the inverse of `to_frames`.
        masks: per group, None or (F*k, d) ones in the first d_j features of each token's own expert.
        scaled_masks: per group, None or the MLP multiplier times the mask.
    """

    frames: int
    ks: tuple[int, ...]
    dims: tuple[int, ...]
    to_frames: Tensor | None = None
    to_groups: Tensor | None = None
    masks: tuple[Tensor | None, ...] | None = None
    scaled_masks: tuple[Tensor | None, ...] | None = None

    def segments(self) -> list[tuple[int, int, int]]:
        """(first row, end row, width) of each group."""
        out, start = [], 0
        for k, d in zip(self.ks, self.dims, strict=True):
            out.append((start, start + self.frames * k, d))
            start += self.frames * k
        return out


class Block(nn.Module):
    """Pre-LN transformer block whose parameter names follow timm's ViT `Block` (norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2), so that timm checkpoints map one to one."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: Tensor) -> Tensor:
        """Dense block on (B, L, D): the temporal transformer."""
        B, L, D = x.shape
        if torch.is_grad_enabled():
            return self.forward_nested(x.reshape(B * L, D), Layout(B, (L,), (D,)), None).view(B, L, D)
        x = x.reshape(B * L, D).clone()
        self.forward_full_width_(x, B, None, None)
        return x.view(B, L, D)

    def forward_nested(self, x: Tensor, layout: Layout, scale: Tensor | None) -> Tensor:
        """One block over tokens grouped by expert.

        Args:
            x: (F*N, D) residual stream in `layout` order.
            layout: the groups.
            scale: (F*N, 1) MLP multiplier alpha*r+1 of each token (Eq. 1), or None for 1.
        """
        if torch.is_grad_enabled():
            return self._update(x, self.attention(x, layout), layout, scale)
        self._forward_inference_(x, layout, scale)
        return x

    def attention(self, x: Tensor, layout: Layout) -> Tensor:
        """Full-width self-attention over all tokens of each frame, (F*N, D) in `layout` order.

        Each group's Q, K, V come from its sliced in-projection LN(x)[:, :d_j] @ W_qkv[:, :d_j]^T (Eq. 4-5).
        """
        D = x.shape[-1]
        H = self.attn.heads
        w, b = self.attn.qkv.weight, self.attn.qkv.bias
        h = F.layer_norm(x, (D,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        segments = layout.segments()
        if len(segments) == 1:
            d = segments[0][2]
            qkv = F.linear(h[:, :d], w[:, :d], b)
        elif torch.is_grad_enabled():
            qkv = torch.cat([F.linear(h[s:e, :d], w[:, :d], b) for s, e, d in segments])
        else:
            qkv = h.new_empty(h.shape[0], 3 * D)
            for s, e, d in segments:
                torch.addmm(b, h[s:e, :d], w[:, :d].t(), out=qkv[s:e])
        if layout.to_frames is not None:
            qkv = qkv.index_select(0, layout.to_frames)
        q, k, v = qkv.view(layout.frames, -1, 3, H, D // H).unbind(2)  # (F, N, H, h) each
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(-1, D)  # (F*N, D) frame order
        return a if layout.to_groups is None else a.index_select(0, layout.to_groups)

    def _update(self, x: Tensor, a: Tensor, layout: Layout, scale: Tensor | None) -> Tensor:
        """Attention out-projection and MLP, out of place (for autograd).

        Out-projections produce only the first d_j outputs (Eq. 5-6), zero-padded to D before the residual
        add.
        """
        D = x.shape[-1]
        out = []
        for s, e, d in layout.segments():
            xs = x[s:e] + F.pad(
                F.linear(a[s:e], self.attn.proj.weight[:d], self.attn.proj.bias[:d]), (0, D - d)
            )
            h = F.layer_norm(xs, (D,), self.norm2.weight, self.norm2.bias, self.norm2.eps)[:, :d]
            u = F.gelu(F.linear(h, self.mlp.fc1.weight[:, :d], self.mlp.fc1.bias))
            y = F.linear(u, self.mlp.fc2.weight[:d], self.mlp.fc2.bias[:d])
            out.append(xs + F.pad(y if scale is None else y * scale[s:e], (0, D - d)))
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward_full_width_(self, x: Tensor, frames: int, mask: Tensor | None, scale: Tensor | None) -> None:
        """The block in place on (F*N, D) tokens in frame order, every product at full width D: inference.

        Each token's expert width d_j is applied by `mask` (F*N, D), 1 in the first d_j features and 0
        beyond: in-projections see LN(x) * mask and out-projections add only their first d_j outputs,
        which is Eq. 4-6 exactly (the zeroed features contribute nothing).  It spends dense FLOPs in one
        matrix product per projection, so on shapes where per-operation overhead outweighs the FLOPs saved
        (a few images of a small model) it is faster than one product per expert (`Plan`).  None for every
        token at full width.

        Args:
            x: (F*N, D) residual stream in frame order, updated in place.
            frames: F.
            mask: (F*N, D) expert-width mask, or None.
            scale: the MLP branch's multiplier (Eq. 1) times `mask`, (F*N, D) or (F*N, 1); None for 1.
        """
        D, H = x.shape[-1], self.attn.heads
        N = x.shape[0] // frames
        step = frames if x.device.type != "cpu" else max(1, min(frames, CHUNK_BYTES // (4 * N * 4 * D)))
        if step >= frames:
            self._full_width_chunk_(x, frames, mask, scale, D, H)
            return
        for f0 in range(0, frames, step):
            n = min(step, frames - f0)
            rows = slice(f0 * N, (f0 + n) * N)
            m = None if mask is None else mask[rows]
            self._full_width_chunk_(x[rows], n, m, None if scale is None else scale[rows], D, H)

    def _full_width_chunk_(
        self, x: Tensor, n: int, mask: Tensor | None, scale: Tensor | None, D: int, H: int
    ) -> None:
        n1, n2 = self.norm1, self.norm2
        h = F.layer_norm(x, (D,), n1.weight, n1.bias, n1.eps)
        if mask is not None:
            h.mul_(mask)
        if x.shape[0] == n:  # one token per frame: attention over a single key returns its value
            a = F.linear(h, self.attn.qkv.weight[2 * D :], self.attn.qkv.bias[2 * D :])
        else:
            qkv = F.linear(h, self.attn.qkv.weight, self.attn.qkv.bias)
            q, k, v = qkv.view(n, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (n, H, N, h) each
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, D)
        y = F.linear(a, self.attn.proj.weight, self.attn.proj.bias)
        if mask is None:
            x.add_(y)
        else:
            x.addcmul_(y, mask)
        h = F.layer_norm(x, (D,), n2.weight, n2.bias, n2.eps)
        if mask is not None:
            h.mul_(mask)
        u = F.linear(h, self.mlp.fc1.weight, self.mlp.fc1.bias)
        torch.ops.aten.gelu_(u)
        y = F.linear(u, self.mlp.fc2.weight, self.mlp.fc2.bias)
        if scale is None:
            x.add_(y)
        else:
            x.addcmul_(y, scale)

    def _forward_inference_(self, x: Tensor, layout: Layout, scale: Tensor | None) -> None:
        """`attention` and `_update` in place on x, for inference, a chunk of frames at a time.

        Attention never mixes frames, so the whole block can run on a few frames before the next few: their
        Q/K/V and MLP hidden then stay in cache between the matrix products instead of making round trips
        through memory.  In `layout` the chunk's tokens are one block of rows per group.  For attention they
        are copied into a (frames, N, 3D) buffer, grouped inside each frame (attention does not depend on the
        order of a frame's tokens), and the output goes back to the groups for the out-projection and MLP.
        """
        D, H, hidden = x.shape[-1], self.attn.heads, self.mlp.fc1.out_features
        w, b = self.attn.qkv.weight, self.attn.qkv.bias
        w_o, b_o = self.attn.proj.weight, self.attn.proj.bias
        w1, b1, w2, b2 = self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias
        n1, n2 = self.norm1, self.norm2
        frames, ks, dims = layout.frames, layout.ks, layout.dims
        N = sum(ks)
        starts = [s for s, _, _ in layout.segments()]
        offsets = list(itertools.accumulate(ks, initial=0))[:-1]  # first token of each group in a frame
        masks = layout.masks or (None,) * len(ks)
        scaled = layout.scaled_masks or (None,) * len(ks)
        single = len(ks) == 1
        step = frames if x.device.type != "cpu" else max(1, min(frames, CHUNK_BYTES // (4 * N * hidden)))
        qkv_buf = x.new_empty(step, N, 3 * D)
        mm_buf = None if single or step == 1 else x.new_empty(step * max(ks), 3 * D)
        u_buf = x.new_empty(step * N, hidden)
        for f0 in range(0, frames, step):
            n = min(step, frames - f0)
            rows = [slice(s + f0 * k, s + (f0 + n) * k) for s, k in zip(starts, ks, strict=True)]
            mrows = [slice(f0 * k, (f0 + n) * k) for k in ks]  # the same rows within a group's mask
            # One LayerNorm call when the chunk is every row; else one per group.
            whole = n1(x) if n == frames else None
            qkv = qkv_buf[:n]
            for r, k, o, d, m, mr in zip(rows, ks, offsets, dims, masks, mrows, strict=True):
                h = (whole[r] if whole is not None else n1(x[r]))[:, :d]
                if m is not None:
                    h = h * m[mr]
                if n == 1 or mm_buf is None:  # the group's rows are contiguous in the buffer
                    torch.addmm(b, h, w[:, :d].t(), out=qkv.view(n * N, 3 * D)[o * n : (o + k) * n])
                else:
                    t = torch.mm(h, w[:, :d].t(), out=mm_buf[: n * k])
                    torch.add(t.view(n, k, 3 * D), b, out=qkv[:, o : o + k])
            q, k_, v = qkv.view(n, N, 3, H, D // H).unbind(2)  # (n, N, H, h) each
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2).reshape(n, N, D)
            for r, k, o, d, m, mr in zip(rows, ks, offsets, dims, masks, mrows, strict=True):
                if m is None:
                    x[r, :d].addmm_(a[:, o : o + k].reshape(n * k, D), w_o[:d].t()).add_(b_o[:d])
                else:
                    y = torch.addmm(b_o[:d], a[:, o : o + k].reshape(n * k, D), w_o[:d].t())
                    x[r, :d].addcmul_(y, m[mr])
            whole = n2(x) if n == frames else None
            u = u_buf[: n * N]
            for r, k, o, d, m, mr in zip(rows, ks, offsets, dims, masks, mrows, strict=True):
                h = (whole[r] if whole is not None else n2(x[r]))[:, :d]
                if m is not None:
                    h = h * m[mr]
                torch.addmm(b1, h, w1[:, :d].t(), out=u[o * n : (o + k) * n])
            torch.ops.aten.gelu_(u)
            for r, k, o, d, sm, mr in zip(rows, ks, offsets, dims, scaled, mrows, strict=True):
                y = torch.addmm(b2[:d], u[o * n : (o + k) * n], w2[:d].t())
                if sm is not None:
                    x[r, :d].addcmul_(y, sm[mr])
                elif scale is None:
                    x[r, :d].add_(y)
                else:
                    x[r, :d].addcmul_(y, scale[r])


def _product_cost(full: float, split: float, rows: int, capacity: float, groups: int) -> float:
    """The fixed cost C of one product, in rows of full-width work, that makes `plan_runs`' cost model
    reproduce two measured times of the same batch of `rows` token rows: full width, t = a*(C + rows), and
    one product per expert of `groups`, t = a*(groups*C + capacity*rows)."""
    denominator = groups * full - split
    if denominator <= 0:
        return math.inf
    return max(0.0, rows * (split - capacity * full) / denominator)


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
        self.full_width_rows = FULL_WIDTH_ROWS
        # d_j per expert on the model's device: no copy from the host inside a forward (CUDA graphs).
        self.expert_widths: Tensor
        self.register_buffer("expert_widths", torch.tensor(cfg.expert_dims), persistent=False)
        self._plans: dict[tuple[int, tuple[int, ...], float], tuple[tuple[int, ...], ...]] = {}
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

    def plan_runs(self, frames: int, counts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """How an inference forward runs `frames` frames split as `counts`: the experts in use, largest
        first, cut into runs of adjacent experts; each run is one matrix product per projection at its
        largest width, with masks for the tokens of its smaller experts.  One run of every expert is the
        whole layer at full width (`Block.forward_full_width_`).

        Per layer, a run costs a product whose FLOPs grow with its token rows times its width, plus a fixed
        cost per product: `full_width_rows`, counted in token rows of full-width work, which depends on the
        device and the model (`calibrate_full_width`).  The cheapest cut under that cost is taken: a small
        batch of a small model runs in one or two products, a large batch in one per expert.
        """
        key = (frames, counts, self.full_width_rows)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._cheapest_runs(frames, counts)
            if len(self._plans) > 4096:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _cheapest_runs(self, frames: int, counts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        used = [j for j in range(len(counts) - 1, -1, -1) if counts[j] > 0]  # largest expert first
        dims, D, C = self.cfg.expert_dims, self.cfg.dim, self.full_width_rows
        best: tuple[float, int, tuple[tuple[int, ...], ...]] | None = None
        for cuts in itertools.product((False, True), repeat=len(used) - 1):
            runs, run = [], [used[0]]
            for j, cut in zip(used[1:], cuts, strict=True):
                if cut:
                    runs.append(tuple(run))
                    run = []
                run.append(j)
            runs.append(tuple(run))
            work = sum(frames * sum(counts[j] for j in r) * dims[r[0]] / D for r in runs)
            cost = (len(runs) * C if len(runs) > 1 or not math.isinf(C) else 0.0) + work
            candidate = (cost, len(runs), tuple(runs))
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        assert best is not None
        return best[2]

    @torch.inference_mode()
    def calibrate_full_width(
        self,
        batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
        capacity: float = 0.5,
        repeats: int = 3,
        budget_s: float = 5.0,
    ) -> float:
        """Measure where one product per expert starts to beat full width with masks on this device, set
        `full_width_rows` to it and return it.

        Both ways are timed on random images at `capacity` (every expert in use) for growing batch sizes,
        until the split wins at two sizes in a row, the sizes run out or `budget_s` is spent.  Where the two
        cost the same, an extra product costs what it saves: F*N*(1 - e_c)/(groups - 1) rows of full-width
        work.  The threshold is the geometric mean of that measure at the last size where full width won and
        the first where the split won.  Where the split wins from the smallest size on, the cost is solved
        from the two times at that size instead (`_product_cost`), at most half that measure.
        """
        cfg = self.cfg
        device = next(self.parameters()).device
        counts = expert_counts(capacity, cfg.num_tokens, cfg.num_experts)
        groups = sum(1 for k in counts if k > 0)
        if groups < 2:
            return self.full_width_rows
        saved = (1.0 - realised_capacity(counts)) * cfg.num_tokens / (groups - 1)  # per frame
        keep = self.full_width_rows
        start = time.perf_counter()
        last_full: int | None = None
        first_split: int | None = None
        first_times = (0.0, 0.0)
        wins = 0
        try:
            for b in batches:
                x = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
                times: dict[float, list[float]] = {}
                for rows in (math.inf, 0.0) * (repeats + 1):  # the first round warms up
                    self.full_width_rows = rows
                    t0 = time.perf_counter()
                    self(x, capacity)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.setdefault(rows, []).append(time.perf_counter() - t0)
                full, split = (statistics.median(times[r][1:]) for r in (math.inf, 0.0))
                if split < full:
                    if first_split is None:
                        first_split, first_times = b, (full, split)
                    wins += 1
                else:
                    last_full, first_split, wins = b, None, 0
                if wins >= 2 or time.perf_counter() - start > budget_s:
                    break
        finally:
            self.full_width_rows = keep
        if first_split is None:  # full width won at the largest size measured
            rows = 2.0 * saved * (last_full or 1)
        elif last_full is None:  # the split won from the smallest size on
            solved = _product_cost(
                *first_times, first_split * cfg.num_tokens, realised_capacity(counts), groups
            )
            rows = min(0.5 * saved * first_split, solved)
        else:
            rows = math.sqrt(saved * last_full * saved * first_split)
        self.full_width_rows = rows
        return rows

    # -- spatial MoNE encoder ------------------------------------------------------------------------
    def embed(self, frames: Tensor) -> Tensor:
        x: Tensor = self.patch_embed(frames)  # (F, D, g, g)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (F, N, D)

    def encode_frames(self, x: Tensor, counts: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """MoNE spatial transformer for frames that share one token split.

        Args:
            x: (F, N, D) embedded tokens.
            counts: k_1..k_E.

        Returns:
            pooled (F, D) average of the final tokens, and the (F, N) expert of each token.
        """
        F_, N, D = x.shape
        E = self.cfg.num_experts
        probs = self.router(x)  # (F, N, E)
        experts = expert_preferred_routing(probs, counts)
        alpha = self.mlp_alpha()
        scale = (alpha * probs.gather(-1, experts.unsqueeze(-1)) + 1.0).view(F_ * N, 1)  # prob of own expert
        runs: tuple[tuple[int, ...], ...]
        if torch.is_grad_enabled():  # training: one product per expert, no masks
            runs = tuple((j,) for j in range(E - 1, -1, -1) if counts[j] > 0)
        else:
            runs = self.plan_runs(F_, counts)
        ks = tuple(sum(counts[j] for j in r) for r in runs)
        dims = tuple(self.cfg.expert_dims[r[0]] for r in runs)
        x = x.reshape(F_ * N, D)
        widths = None
        if any(len(r) > 1 for r in runs):
            widths = self.expert_widths[experts].view(F_ * N, 1)
        if len(runs) == 1 and dims == (D,) and not torch.is_grad_enabled():  # full width, frame order
            mask = None
            if widths is not None:
                mask = (torch.arange(D, device=x.device) < widths).to(x.dtype)  # (F*N, D)
                scale = scale * mask
            for blk in self.blocks:
                cast(Block, blk).forward_full_width_(x, F_, mask, scale)
            return x.view(F_, N, D).mean(dim=1), experts
        to_frames = to_groups = None
        if len(runs) > 1:
            # Permute once: each run's tokens become one block of rows for every layer, frame-major.
            run_of = torch.empty(E, dtype=torch.long, device=x.device)
            for i, r in enumerate(runs):
                run_of[min(r) : max(r) + 1] = i  # an expert inside a run but unused has no tokens
            perm = torch.argsort(run_of[experts], dim=1, stable=True)  # (F, N), first run (largest) first
            flat = perm + N * torch.arange(F_, device=x.device).unsqueeze(1)
            starts = [sum(ks[:g]) for g in range(len(ks))]
            rows = torch.cat([flat[:, s : s + k].reshape(-1) for s, k in zip(starts, ks, strict=True)])
            x, scale = x.index_select(0, rows), scale.index_select(0, rows)
            if widths is not None:
                widths = widths.index_select(0, rows)
            if F_ > 1:
                to_frames = torch.argsort(rows // N, stable=True)
                to_groups = torch.empty_like(to_frames)
                to_groups[to_frames] = torch.arange(len(rows), device=x.device)
        layout = Layout(F_, ks, dims, to_frames, to_groups)
        if widths is not None:  # some run holds several experts: masks for their narrower tokens
            mask_list: list[Tensor | None] = []
            scaled_list: list[Tensor | None] = []
            for r, (lo, hi, d) in zip(runs, layout.segments(), strict=True):
                m = None if len(r) == 1 else (torch.arange(d, device=x.device) < widths[lo:hi]).to(x.dtype)
                mask_list.append(m)  # (F*k, d)
                scaled_list.append(None if m is None else scale[lo:hi] * m)
            layout = dataclasses.replace(layout, masks=tuple(mask_list), scaled_masks=tuple(scaled_list))
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
        if self.cfg.temporal_depth:
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
