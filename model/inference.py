"""The fast inference forward of the MoNE ViT: the same model as `model/vit.py`, in place and with fewer
operations.

`model/vit.py` holds the readable forward, which training runs: one product per expert and projection, out of
place for autograd.  Without autograd (`torch.no_grad` or `torch.inference_mode`) `MoNE.encode_frames` and
`Block.forward` hand over to this module, which computes the same function (Eq. 1 and 4-6; the tests compare
the two) with these tricks:

- **Permute once.**  After routing, the tokens are permuted once so that each group of experts' tokens, of
  every frame, form one dense block of rows (`mone.model.routing.group_tokens`, shared with training).  Every
  layer then runs one matrix product per group on its block, with no gather or scatter per layer.  Average
  pooling makes an un-permute unnecessary.
- **Contiguous weight slices.**  An expert's weights are views of the full ones, `W[:, :d_j]` for an
  in-projection and `W[:d_j]` for an out-projection (a sub-matrix with a leading dimension), so no weight is
  copied and no per-expert copy is kept.  Out-projections accumulate in place into the first d_j columns of
  the residual stream (`x[:, :d_j].addmm_(a, W_o[:d_j]^T)`), and the MLP's scaled residual add is one
  `addcmul_`.
- **Runs of experts at one width, with masks.**  One product per expert is up to four products (and their
  bookkeeping) where a dense layer has one; on a small model at a small batch every operation costs about as
  much as its arithmetic.  So adjacent experts may share one product: a *run* is one block of rows multiplied
  at the run's largest width, with a mask of ones in the first d_j features of each token, applied as
  `LN(x) * mask` into the in-projections and `y * mask` out of the out-projections (`RunLayout`).  That is
  Eq. 4-6 exactly: the zeroed features add nothing.  One run of every expert is the whole layer at full
  width, in frame order, with no permutation at all (`forward_full_width_`).  `plan_runs` picks the cut from a
  cost model whose cost per product, `MoNE.full_width_rows`, `calibrate_full_width` measures on the device.
- **A per-frame Q/K/V buffer.**  Attention needs each frame's tokens together.  Instead of permuting Q/K/V
  into frame order and back in every layer, as training does, each group's in-projection writes its rows
  straight into a (frames, N, 3D) buffer, grouped inside each frame (attention does not depend on the order
  of a frame's tokens), and the attention output is read back per group.
- **Packed weights on the CPU.**  In fp32, each product of at least `PACK_MIN_MACS` multiply-adds runs
  through oneDNN on a copy of its weight slice packed once into oneDNN's blocked layout (`linear`), and fc1
  applies its GELU in the same call.  On 2 vCPUs this is 10-60 % faster than `addmm` for S/16's full-width
  products, and about even for its narrowest expert's.  The packed copies are made on first use, one per
  layer, projection and width in use (at most 1.9x the blocks' weights), and remade when the weights
  change.  `PACKED` turns it off.
- **Chunks of frames.**  Attention never mixes frames, so on the CPU a whole block runs on a few frames
  before the next few (`CHUNK_BYTES` of MLP hidden): their Q/K/V and MLP hidden stay in cache between the
  matrix products instead of making round trips through memory.  On a GPU one chunk holds every frame.

docs/model.md ("The fast path") gives the figures behind these choices.

Shape legend as in `model/vit.py`: F frames, N tokens per frame, D width, E experts, H heads, k_j tokens of
expert j in one frame, d_j width of expert j.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model.capacity import expert_counts, realised_capacity
from mone.model.routing import Layout, group_tokens

if TYPE_CHECKING:
    from mone.model.vit import Block, MoNE

# Bytes of MLP hidden per chunk of frames at inference on the CPU (`forward_grouped_`); of 4, 8, 16 and
# 32 MiB, 16 was fastest for S/16 at batch 32 on a 2-core Zen 3 with 32 MiB of L3.  On a GPU one chunk holds
# every frame.
CHUNK_BYTES = 16 << 20

# Default of `MoNE.full_width_rows` (CPU): what one more product costs, in token rows of full-width work
# (`plan_runs`); measured on 2 vCPUs it is 15-90 for Mi/4 and under 16 for S/16, whose rows cost more.
# `calibrate_full_width` measures it per model and device.
FULL_WIDTH_ROWS = 32.0


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear (x86 and Arm CPU builds do)."""
    ops = torch.ops.mkldnn
    return bool(
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


# Whether fp32 products on the CPU run through oneDNN on packed weights (`linear`).
PACKED = packing_available()
# The row count oneDNN is told to pack for; the packed weight serves any number of rows.
PACK_ROWS = 196
# Products of fewer multiply-adds run as `addmm` on the weight view: below about 8 M (rows x d_in x d_out),
# oneDNN's fixed cost per call outweighs what packing saves (2 vCPUs, Mi/4 and S/16 shapes, 1 and 2 threads).
PACK_MIN_MACS = 8_000_000


def packs(x: Tensor, d_in: int, d_out: int) -> bool:
    """Whether `linear` runs x (rows, d_in) -> (rows, d_out) on a packed weight."""
    return (
        PACKED
        and not torch.compiler.is_compiling()  # an exported forward (server/core/compiled.py) traces addmm
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() // x.shape[-1] * d_in * d_out >= PACK_MIN_MACS
    )


@dataclass(frozen=True)
class RunLayout(Layout):
    """A `Layout` whose groups are runs of adjacent experts: each runs at the largest of their widths, and
    `masks` zero what lies beyond each token's own width.

    Attributes:
        masks: per group, None (one expert) or (F*k, d) ones in the first d_j features of each token's own
            expert.
        scaled_masks: per group, None or the MLP multiplier times the mask.
    """

    masks: tuple[Tensor | None, ...] | None = None
    scaled_masks: tuple[Tensor | None, ...] | None = None


# -- packed weights ------------------------------------------------------------------------------------------
# Per linear layer: (d_in, d_out) -> (the weight's storage, its version, the packed copy).  Weakly keyed, so a
# model's packed copies go with it and deep copies of a model never share them.
_PACKS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], tuple[int, int, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def linear(
    x: Tensor, layer: nn.Linear, d_in: int | None = None, d_out: int | None = None, gelu: bool = False
) -> Tensor:
    """x @ W^T + b through the first `d_in` input features of W (an in-projection's expert) or to its first
    `d_out` outputs (an out-projection's), then GELU when `gelu`; x has `d_in` features.

    On the CPU in fp32 (and `PACKED`), for a product of at least `PACK_MIN_MACS`, it runs through oneDNN on
    the weight slice packed once into its blocked layout, with the GELU in the same call; otherwise it is
    `F.linear` on a view of the weight.
    A packed copy is remade when the weight changes (a new storage or an in-place update)."""
    w: Tensor = layer.weight
    b: Tensor = layer.bias
    if d_in is not None and d_in < w.shape[1]:
        w = w[:, :d_in]
    if d_out is not None and d_out < w.shape[0]:
        w, b = w[:d_out], b[:d_out]
    if w.dtype != torch.float32 or not packs(x, w.shape[1], w.shape[0]):
        y = F.linear(x, w, b)
        return torch.ops.aten.gelu_(y) if gelu else y
    cache = _PACKS.get(layer)
    if cache is None:
        cache = _PACKS.setdefault(layer, {})
    key = (w.shape[1], w.shape[0])
    stamp = (layer.weight.data_ptr(), layer.weight._version)
    entry = cache.get(key)
    if entry is None or entry[:2] != stamp:
        entry = (*stamp, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS))
        cache[key] = entry
    if gelu:
        return cast(Tensor, torch.ops.mkldnn._linear_pointwise(x, entry[2], b, "gelu", [], "none"))
    return cast(Tensor, torch.ops.mkldnn._linear_pointwise(x, entry[2], b, "none", [], ""))


# -- the spatial encoder -------------------------------------------------------------------------------------
def encode_frames_(net: MoNE, x: Tensor, experts: Tensor, counts: tuple[int, ...], scale: Tensor) -> Tensor:
    """The MoNE spatial transformer after routing, at inference (`MoNE.encode_frames`).

    Args:
        net: the model.
        x: (F, N, D) embedded tokens; overwritten.
        experts: (F, N) expert of each token.
        counts: k_1..k_E.
        scale: (F*N, 1) MLP multiplier alpha*r+1 of each token (Eq. 1).

    Returns:
        pooled (F, D) average of the final tokens.
    """
    F_, N, D = x.shape
    runs = plan_runs(net, F_, counts)
    ks = tuple(sum(counts[j] for j in r) for r in runs)
    dims = tuple(net.cfg.expert_dims[r[0]] for r in runs)
    x = x.reshape(F_ * N, D)
    widths = None
    if any(len(r) > 1 for r in runs):
        widths = net.expert_widths[experts].view(F_ * N, 1)
    if len(runs) == 1 and dims == (D,):  # full width, frame order
        mask = None
        if widths is not None:
            mask = (torch.arange(D, device=x.device) < widths).to(x.dtype)  # (F*N, D)
            scale = scale * mask
        for blk in net.blocks:
            forward_full_width_(cast("Block", blk), x, F_, mask, scale)
        return x.view(F_, N, D).mean(dim=1)
    rows, groups = group_tokens(experts, net.cfg.num_experts, runs, ks, dims)
    if rows is not None:
        x, scale = x.index_select(0, rows), scale.index_select(0, rows)
        if widths is not None:
            widths = widths.index_select(0, rows)
    masks = scaled = None
    if widths is not None:  # some run holds several experts: masks for their narrower tokens
        mask_list: list[Tensor | None] = []
        scaled_list: list[Tensor | None] = []
        for r, (lo, hi, d) in zip(runs, groups.segments(), strict=True):
            m = None if len(r) == 1 else (torch.arange(d, device=x.device) < widths[lo:hi]).to(x.dtype)
            mask_list.append(m)  # (F*k, d)
            scaled_list.append(None if m is None else scale[lo:hi] * m)
        masks, scaled = tuple(mask_list), tuple(scaled_list)
    layout = RunLayout(groups.frames, ks, dims, groups.to_frames, groups.to_groups, masks, scaled)
    for blk in net.blocks:
        forward_grouped_(cast("Block", blk), x, layout, scale)
    if layout.to_frames is not None:
        x = x.index_select(0, layout.to_frames)
    return x.view(F_, N, D).mean(dim=1)  # global average pooling, no un-permute needed


# -- runs of experts -----------------------------------------------------------------------------------------
def plan_runs(net: MoNE, frames: int, counts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """How an inference forward runs `frames` frames split as `counts`: the experts in use, largest
    first, cut into runs of adjacent experts; each run is one matrix product per projection at its
    largest width, with masks for the tokens of its smaller experts.  One run of every expert is the
    whole layer at full width (`forward_full_width_`).

    Per layer, a run costs a product whose FLOPs grow with its token rows times its width, plus a fixed
    cost per product: `net.full_width_rows`, counted in token rows of full-width work, which depends on the
    device and the model (`calibrate_full_width`).  The cheapest cut under that cost is taken: a small
    batch of a small model runs in one or two products, a large batch in one per expert.
    """
    return _cheapest_runs(frames, counts, net.cfg.expert_dims, net.cfg.dim, net.full_width_rows)


@functools.lru_cache(maxsize=4096)
def _cheapest_runs(
    frames: int, counts: tuple[int, ...], dims: tuple[int, ...], D: int, C: float
) -> tuple[tuple[int, ...], ...]:
    used = [j for j in range(len(counts) - 1, -1, -1) if counts[j] > 0]  # largest expert first
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


# -- one block at full width, in frame order -----------------------------------------------------------------
def forward_dense(blk: Block, x: Tensor) -> Tensor:
    """`Block.forward` at inference: the dense block on (B, L, D), every token at full width (the temporal
    transformer)."""
    B, L, D = x.shape
    x = x.reshape(B * L, D).clone()
    forward_full_width_(blk, x, B, None, None)
    return x.view(B, L, D)


def forward_full_width_(
    blk: Block, x: Tensor, frames: int, mask: Tensor | None, scale: Tensor | None
) -> None:
    """The block in place on (F*N, D) tokens in frame order, every product at full width D.

    Each token's expert width d_j is applied by `mask` (F*N, D), 1 in the first d_j features and 0
    beyond: in-projections see LN(x) * mask and out-projections add only their first d_j outputs,
    which is Eq. 4-6 exactly (the zeroed features contribute nothing).  It spends dense FLOPs in one
    matrix product per projection, so on shapes where per-operation overhead outweighs the FLOPs saved
    (a few images of a small model) it is faster than one product per expert (`plan_runs`).  None for every
    token at full width.

    Args:
        blk: the block.
        x: (F*N, D) residual stream in frame order, updated in place.
        frames: F.
        mask: (F*N, D) expert-width mask, or None.
        scale: the MLP branch's multiplier (Eq. 1) times `mask`, (F*N, D) or (F*N, 1); None for 1.
    """
    D, H = x.shape[-1], blk.heads
    N = x.shape[0] // frames
    step = frames if x.device.type != "cpu" else max(1, min(frames, CHUNK_BYTES // (4 * N * 4 * D)))
    if step >= frames:
        _full_width_chunk_(blk, x, frames, mask, scale, D, H)
        return
    for f0 in range(0, frames, step):
        n = min(step, frames - f0)
        rows = slice(f0 * N, (f0 + n) * N)
        m = None if mask is None else mask[rows]
        _full_width_chunk_(blk, x[rows], n, m, None if scale is None else scale[rows], D, H)


def _full_width_chunk_(
    blk: Block, x: Tensor, n: int, mask: Tensor | None, scale: Tensor | None, D: int, H: int
) -> None:
    n1, n2 = blk.norm1, blk.norm2
    h = F.layer_norm(x, (D,), n1.weight, n1.bias, n1.eps)
    if mask is not None:
        h.mul_(mask)
    if x.shape[0] == n:  # one token per frame: attention over a single key returns its value
        a = F.linear(h, blk.qkv.weight[2 * D :], blk.qkv.bias[2 * D :])
    else:
        qkv = linear(h, blk.qkv)
        q, k, v = qkv.view(n, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (n, H, N, h) each
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, D)
    y = linear(a, blk.proj)
    if mask is None:
        x.add_(y)
    else:
        x.addcmul_(y, mask)
    h = F.layer_norm(x, (D,), n2.weight, n2.bias, n2.eps)
    if mask is not None:
        h.mul_(mask)
    y = linear(linear(h, blk.fc1, gelu=True), blk.fc2)
    if scale is None:
        x.add_(y)
    else:
        x.addcmul_(y, scale)


# -- one block over groups of experts ------------------------------------------------------------------------
def forward_grouped_(blk: Block, x: Tensor, layout: RunLayout, scale: Tensor | None) -> None:
    """`Block.forward_nested` in place on x, for inference, a chunk of frames at a time.

    Attention never mixes frames, so the whole block can run on a few frames before the next few: their
    Q/K/V and MLP hidden then stay in cache between the matrix products instead of making round trips
    through memory.  In `layout` the chunk's tokens are one block of rows per group.  For attention they
    are copied into a (frames, N, 3D) buffer, grouped inside each frame (attention does not depend on the
    order of a frame's tokens), and the output goes back to the groups for the out-projection and MLP.

    Args:
        blk: the block.
        x: (F*N, D) residual stream in `layout` order, updated in place.
        layout: the groups.
        scale: (F*N, 1) MLP multiplier alpha*r+1 of each token (Eq. 1), or None for 1.
    """
    D, H, hidden = x.shape[-1], blk.heads, blk.fc1.out_features
    w, b = blk.qkv.weight, blk.qkv.bias
    w_o, b_o = blk.proj.weight, blk.proj.bias
    n1, n2 = blk.norm1, blk.norm2
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
            if packs(h, d, 3 * D):
                t = linear(h, blk.qkv, d_in=d)
                if single:
                    qkv = t.view(n, N, 3 * D)
                else:
                    qkv[:, o : o + k].copy_(t.view(n, k, 3 * D))
            elif n == 1 or mm_buf is None:  # the group's rows are contiguous in the buffer
                torch.addmm(b, h, w[:, :d].t(), out=qkv.view(n * N, 3 * D)[o * n : (o + k) * n])
            else:
                t = torch.mm(h, w[:, :d].t(), out=mm_buf[: n * k])
                torch.add(t.view(n, k, 3 * D), b, out=qkv[:, o : o + k])
        q, k_, v = qkv.view(n, N, 3, H, D // H).unbind(2)  # (n, N, H, h) each
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(n, N, D)
        for r, k, o, d, m, mr in zip(rows, ks, offsets, dims, masks, mrows, strict=True):
            ag = a[:, o : o + k].reshape(n * k, D)
            if m is None and not packs(ag, D, d):
                x[r, :d].addmm_(ag, w_o[:d].t()).add_(b_o[:d])  # accumulated in place
            elif m is None:
                x[r, :d].add_(linear(ag, blk.proj, d_out=d))
            else:
                x[r, :d].addcmul_(linear(ag, blk.proj, d_out=d), m[mr])
        whole = n2(x) if n == frames else None
        for r, d, m, sm, mr in zip(rows, dims, masks, scaled, mrows, strict=True):  # the MLP
            h = (whole[r] if whole is not None else n2(x[r]))[:, :d]
            if m is not None:
                h = h * m[mr]
            y = linear(linear(h, blk.fc1, d_in=d, gelu=True), blk.fc2, d_out=d)
            if sm is not None:
                x[r, :d].addcmul_(y, sm[mr])
            elif scale is None:
                x[r, :d].add_(y)
            else:
                x[r, :d].addcmul_(y, scale[r])


# -- the cost of a product -----------------------------------------------------------------------------------
@torch.inference_mode()
def calibrate_full_width(
    net: MoNE,
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
    capacity: float = 0.5,
    repeats: int = 3,
    budget_s: float = 5.0,
    forward: Callable[[Tensor, float], object] | None = None,
    margin: float = 1.0,
) -> float:
    """Measure where one product per expert starts to beat full width with masks on this device, set
    `net.full_width_rows` to it and return it.

    `forward(x, capacity)` runs each timed forward (default `net(x, capacity)`): a server that runs several
    forwards side by side passes one that runs them so, since what a product costs includes what the
    forwards cost each other (their Python between operations shares one interpreter lock).  `margin` > 1
    counts the split as faster only when it wins by that factor: it has more operations, whose cost grows
    with whatever else runs Python beside them (a server's event loop), so a narrow win measured here is a
    loss under load.  The margin applies in proportion to the share of a forward's time that is such
    per-operation cost (`overhead_share`): in full on a small model whose forward is mostly overhead, hardly
    at all on a large one whose time goes to arithmetic.

    Both ways are timed on random images at `capacity` (every expert in use) for growing batch sizes,
    until the split wins at two sizes in a row, the sizes run out or `budget_s` is spent.  Where the two
    cost the same, an extra product costs what it saves: F*N*(1 - e_c)/(groups - 1) rows of full-width
    work.  The threshold is the geometric mean of that measure at the last size where full width won and
    the first where the split won.  Where the split wins from the smallest size on, the cost is solved
    from the two times at that size instead (`_product_cost`), at most half that measure; where full width
    wins at every size measured, it is solved from the times at the last size (the split's times the
    margin), between one and four times that measure.
    """
    cfg = net.cfg
    counts = expert_counts(capacity, cfg.num_tokens, cfg.num_experts)
    groups = sum(1 for k in counts if k > 0)
    if groups < 2:
        return net.full_width_rows
    saved = (1.0 - realised_capacity(counts)) * cfg.num_tokens / (groups - 1)  # per frame
    start = time.perf_counter()
    if margin > 1.0:
        margin = 1.0 + (margin - 1.0) * overhead_share(net, batches[0], capacity, repeats, forward)
    last_full: int | None = None
    first_split: int | None = None
    first_times = last_times = (0.0, 0.0)
    wins = 0
    for b in batches:
        times = _median_times(net, [(b, math.inf), (b, 0.0)], capacity, repeats, forward)
        full, split = times[(b, math.inf)], times[(b, 0.0)]
        if split * margin < full:
            if first_split is None:
                first_split, first_times = b, (full, split)
            wins += 1
        else:
            last_full, first_split, wins = b, None, 0
            last_times = (full, split * margin)
        if wins >= 2 or time.perf_counter() - start > budget_s:
            break
    if first_split is None:  # full width won at the largest size measured: at least what it saves there
        size = last_full or 1
        at_least = saved * size
        solved = _product_cost(*last_times, size * cfg.num_tokens, realised_capacity(counts), groups)
        rows = min(max(at_least, solved), 4.0 * at_least)
    elif last_full is None:  # the split won from the smallest size on
        solved = _product_cost(*first_times, first_split * cfg.num_tokens, realised_capacity(counts), groups)
        rows = min(0.5 * saved * first_split, solved)
    else:
        rows = math.sqrt(saved * last_full * saved * first_split)
    net.full_width_rows = rows
    return rows


@torch.inference_mode()
def overhead_share(
    net: MoNE,
    batch: int = 1,
    capacity: float = 0.5,
    repeats: int = 3,
    forward: Callable[[Tensor, float], object] | None = None,
) -> float:
    """The share of a full-width forward of `batch` images that does not grow with the batch: with t(b) the
    time of b images, (2 t(b) - t(2b)) / t(b), clamped to [0, 1].  About 0.8 for Mi/4 at one image on 2
    vCPUs (a few hundred operations on 49 tokens), under 0.1 for S/16."""
    times = _median_times(net, [(batch, math.inf), (2 * batch, math.inf)], capacity, repeats, forward)
    one, two = times[(batch, math.inf)], times[(2 * batch, math.inf)]
    return min(1.0, max(0.0, (2 * one - two) / one)) if one > 0 else 1.0


def _median_times(
    net: MoNE,
    cases: Sequence[tuple[int, float]],
    capacity: float,
    repeats: int,
    forward: Callable[[Tensor, float], object] | None,
) -> dict[tuple[int, float], float]:
    """Median seconds of a forward of b random images at `capacity` with `full_width_rows` = rows, for each
    (b, rows) of `cases`, taken in turn `repeats` times after a warm-up round; `full_width_rows` is kept."""
    cfg = net.cfg
    device = next(net.parameters()).device
    inputs = {b: torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, device=device) for b, _ in cases}
    keep = net.full_width_rows
    times: dict[tuple[int, float], list[float]] = {}
    try:
        for case in list(cases) * (repeats + 1):
            net.full_width_rows = case[1]
            t0 = time.perf_counter()
            (forward or net)(inputs[case[0]], capacity)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.setdefault(case, []).append(time.perf_counter() - t0)
    finally:
        net.full_width_rows = keep
    return {case: statistics.median(t[1:]) for case, t in times.items()}


def _product_cost(full: float, split: float, rows: int, capacity: float, groups: int) -> float:
    """The fixed cost C of one product, in rows of full-width work, that makes `plan_runs`' cost model
    reproduce two measured times of the same batch of `rows` token rows: full width, t = a*(C + rows), and
    one product per expert of `groups`, t = a*(groups*C + capacity*rows)."""
    denominator = groups * full - split
    if denominator <= 0:
        return math.inf
    return max(0.0, rows * (split - capacity * full) / denominator)
