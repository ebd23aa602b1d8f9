"""Token Merging (ToMe) over the weights of a dense MoNE model: the training-free baseline for run-time
compute cuts (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461).

In every spatial layer, after attention, bipartite soft matching merges the r most similar tokens of set A
(even positions) into their best match in set B (odd positions); similarity is the cosine of the
attention keys averaged over heads.  Merged tokens are size-weighted averages, attention is proportional
(log size added to the keys' logits), and the pooled feature is the size-weighted mean, so with r = 0 the
forward equals the dense model's (`MoNE` at capacity 1.0, router scale alpha * r + 1 included).

Shape legend: F frames, n tokens in a frame at the current layer, D width, H heads, h head width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mone.model.config import MoNEConfig
from mone.model.flops import clip_tail_flops
from mone.model.vit import Block, MoNE


def _schedule(r: int | Sequence[int], depth: int) -> list[int]:
    rs = [int(r)] * depth if isinstance(r, int) else [int(v) for v in r]
    if len(rs) != depth or any(v < 0 for v in rs):
        raise ValueError(f"r must be a non-negative int or one per layer ({depth}), got {r!r}")
    return rs


def bipartite_merge(x: Tensor, size: Tensor, metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Merge r tokens of (F, n, C) features `x` with sizes (F, n, 1), matching on `metric` (F, n, c).

    Returns the merged features (F, n - r, C) (size-weighted means) and their sizes (F, n - r, 1).
    """
    n = x.shape[1]
    r = min(r, n // 2)
    if r <= 0:
        return x, size
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (F, nA, nB)
    node_max, node_idx = scores.max(dim=-1)  # (F, nA): best B partner of each A token
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # (F, nA, 1)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]  # unmerged A tokens, merged A tokens
    dst_idx = node_idx[..., None].gather(1, src_idx)  # (F, r, 1)

    def merge(t: Tensor) -> Tensor:
        ta, tb = t[:, ::2], t[:, 1::2]
        C = t.shape[-1]
        unm = ta.gather(1, unm_idx.expand(-1, -1, C))
        src = ta.gather(1, src_idx.expand(-1, -1, C))
        tb = tb.scatter_reduce(1, dst_idx.expand(-1, -1, C), src, reduce="sum")
        return torch.cat([unm, tb], dim=1)

    x_sum = merge(x * size)
    new_size = merge(size)
    return x_sum / new_size, new_size


def _block(blk: Block, x: Tensor, size: Tensor, scale: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """One dense pre-LN block with proportional attention, then ToMe, then the MLP (ToMe's order)."""
    F_, n, D = x.shape
    H = blk.heads
    qkv = blk.qkv(blk.norm1(x)).view(F_, n, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (3, F, H, n, h)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = size.log().view(F_, 1, 1, n)  # proportional attention: a token of size s counts s times
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (F, H, n, h)
    x = x + blk.proj(a.transpose(1, 2).reshape(F_, n, D))
    if r > 0:
        # The router scale travels with its token: merge it as one more feature channel.
        merged, size = bipartite_merge(torch.cat([x, scale], dim=-1), size, k.mean(dim=1), r)
        x, scale = merged[..., :D], merged[..., D:]
    y = blk.fc2(F.gelu(blk.fc1(blk.norm2(x))))
    return x + scale * y, size, scale


@torch.no_grad()
def tome_forward(net: MoNE, x: Tensor, r: int | Sequence[int]) -> Tensor:
    """Logits of the dense model `net` with ToMe: x (B, C, H, W) images or (B, T, C, H, W) clips,
    normalised; r tokens merged per spatial layer (an int, or one value per layer)."""
    cfg = net.cfg
    rs = _schedule(r, cfg.depth)
    if x.dim() == 4:
        x = x.unsqueeze(1)
    B, T = x.shape[:2]
    tokens = net.embed(x.flatten(0, 1))  # (F, N, D)
    probs = net.router(tokens)  # (F, N, E)
    alpha = net.alpha.clamp(0.0, 1.0 - 1e-6)
    scale = alpha * probs[..., -1:] + 1.0  # at capacity 1.0 every token is on the full (last) expert
    size = torch.ones_like(scale)
    h = tokens
    blocks: list[Block] = list(net.blocks)  # type: ignore[arg-type]
    for blk, r_l in zip(blocks, rs, strict=True):
        h, size, scale = _block(blk, h, size, scale, r_l)
    pooled = (h * size).sum(dim=1) / size.sum(dim=1)  # size-weighted GAP = GAP over the original tokens
    z = net.fc_norm(pooled).view(B, T, -1)
    if cfg.temporal_depth:
        z = z + net.temporal_pos[:, :T]
        for tblk in net.temporal_blocks:
            z = tblk(z)
        z = net.temporal_norm(z)
    return net.forward_head(z.mean(dim=1))


def tome_tokens(cfg: MoNEConfig, r: int | Sequence[int]) -> list[int]:
    """Tokens entering each spatial layer, and after the last one: depth + 1 values."""
    n, out = cfg.num_tokens, [cfg.num_tokens]
    for r_l in _schedule(r, cfg.depth):
        n -= min(r_l, n // 2)
        out.append(n)
    return out


def tome_gflops(cfg: MoNEConfig, r: int | Sequence[int], frames: int = 1) -> float:
    """Analytic GFLOPs (multiply-add = 2) of one image / clip under ToMe, counted like `mone.model.flops`:
    projections and MLP at the token count where they run, attention at n^2, plus the matching scores."""
    D, N, E = cfg.dim, cfg.num_tokens, cfg.num_experts
    hidden = cfg.mlp_ratio * D
    per_frame = 2 * N * D * cfg.in_chans * cfg.patch_size**2 + 2 * N * D * E  # patch embedding, router
    counts = tome_tokens(cfg, r)
    for n, n_after in zip(counts[:-1], counts[1:], strict=True):
        per_frame += 2 * n * D * 3 * D + 4 * n * n * D + 2 * n * D * D  # QKV, attention, out-projection
        if n_after < n:
            per_frame += 2 * ((n + 1) // 2) * (n // 2) * D  # bipartite similarity scores
        per_frame += 2 * n_after * 2 * D * hidden  # MLP on the merged tokens
    return (frames * per_frame + clip_tail_flops(cfg, frames)) / 1e9
