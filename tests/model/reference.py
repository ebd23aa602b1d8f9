"""A slow, literal MoNE forward written from the paper's equations with per-token masks.

Every token keeps its own expert width d_j: in-projections see LN(x) with features beyond d_j zeroed
(X ⊙_d W, Eq. 4), out-projections keep only the first d_j outputs including the bias (X ⊡_d W, Eq. 5-6),
and the MLP branch is scaled by alpha * r + 1 (Eq. 1).  No permutation, no grouping: the fast model must
agree with this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mone.model import MoNE
from mone.model.capacity import expert_counts
from mone.model.routing import expert_preferred_routing


def reference_forward(net: MoNE, x: Tensor, capacity: float, experts: Tensor | None = None) -> Tensor:
    """Logits for images (B, C, H, W) or clips (B, T, C, H, W), all at one capacity."""
    cfg = net.cfg
    if x.dim() == 4:
        x = x.unsqueeze(1)
    B, T = x.shape[:2]
    tok = net.embed(x.flatten(0, 1))  # (F, N, D)
    F_, N, D = tok.shape
    H = cfg.heads
    probs = net.router(tok)
    if experts is None:
        experts = expert_preferred_routing(probs, expert_counts(capacity, N, cfg.num_experts))
    widths = torch.tensor(cfg.expert_dims)[experts]  # (F, N) d_j per token
    mask = (torch.arange(D)[None, None, :] < widths[..., None]).to(tok.dtype)  # (F, N, D)
    r = probs.gather(-1, experts.unsqueeze(-1))  # (F, N, 1)
    scale = net.alpha.clamp(0.0, 1.0 - 1e-6) * r + 1.0  # forward value of net.mlp_alpha()
    for blk in net.blocks:
        h = F.layer_norm(tok, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps) * mask
        q, k, v = (
            F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
            .view(F_, N, 3, H, D // H)
            .permute(2, 0, 3, 1, 4)
        )
        att = ((q @ k.transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(F_, N, D)
        tok = tok + F.linear(att, blk.attn.proj.weight, blk.attn.proj.bias) * mask
        h = F.layer_norm(tok, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps) * mask
        y = F.linear(
            F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias
        )
        tok = tok + scale * y * mask
    z = net.fc_norm(tok.mean(dim=1)).view(B, T, D)
    if cfg.temporal_depth:
        z = z + net.temporal_pos[:, :T]
        for blk in net.temporal_blocks:
            Bz, L, _ = z.shape
            h = blk.norm1(z)
            q, k, v = blk.attn.qkv(h).view(Bz, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-1, -2)) / (D // H) ** 0.5).softmax(-1) @ v
            z = z + blk.attn.proj(att.transpose(1, 2).reshape(Bz, L, D))
            z = z + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(z))))
        z = net.temporal_norm(z)
    return net.head(z.mean(dim=1))
