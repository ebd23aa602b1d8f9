"""Dense ViT references with the same shapes as a MoNE model, for speed comparisons and exactness tests.

`PlainViT` is a pre-LN ViT written with `F.linear` + `scaled_dot_product_attention` that reads a MoNE state
dict (with `packed=True` its products run as the MoNE forward's do on the CPU, through oneDNN on packed
weights: `mone.model.inference.linear`); `FusedViT` is PyTorch's `nn.TransformerEncoder`, whose inference
fast path runs each layer as one fused native op.  Both pool by global average and share patch embedding
and head with the MoNE model.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model import MoNE, inference
from mone.model.vit import Block


class PlainViT(nn.Module):
    """Dense ViT on the weights of `mone` (a view, not a copy)."""

    def __init__(self, mone: MoNE, packed: bool = False) -> None:
        super().__init__()
        self.m = mone
        self.packed = packed

    def forward(self, x: Tensor) -> Tensor:
        m = self.m
        linear = _packed_linear if self.packed else _plain_linear
        x = m.embed(x)  # (B, N, D)
        B, N, D = x.shape
        for b in m.blocks:
            blk = cast(Block, b)
            H = blk.heads
            h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
            qkv = linear(h, blk.qkv).view(B, N, 3, H, D // H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, h) each
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
            x = x + linear(a, blk.proj)
            h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            x = x + linear(linear(h, blk.fc1, gelu=True), blk.fc2)
        return m.forward_head(m.fc_norm(x.mean(dim=1)))


def _plain_linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def _packed_linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    return inference.linear(x, layer, gelu=gelu)


class FusedViT(nn.Module):
    """The same dense ViT as `nn.TransformerEncoder` layers (fast path in eval + inference mode)."""

    def __init__(self, mone: MoNE) -> None:
        super().__init__()
        cfg = mone.cfg
        self.m = mone
        layer = nn.TransformerEncoderLayer(
            cfg.dim,
            cfg.heads,
            cfg.mlp_ratio * cfg.dim,
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        with torch.no_grad():
            for mine, b in zip(self.encoder.layers, mone.blocks, strict=True):
                blk = cast(Block, b)
                mine.self_attn.in_proj_weight.copy_(blk.qkv.weight)
                mine.self_attn.in_proj_bias.copy_(blk.qkv.bias)
                mine.self_attn.out_proj.weight.copy_(blk.proj.weight)
                mine.self_attn.out_proj.bias.copy_(blk.proj.bias)
                mine.linear1.load_state_dict(blk.fc1.state_dict())
                mine.linear2.load_state_dict(blk.fc2.state_dict())
                mine.norm1.load_state_dict(blk.norm1.state_dict())
                mine.norm2.load_state_dict(blk.norm2.state_dict())
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.encoder(self.m.embed(x))
        return self.m.forward_head(self.m.fc_norm(x.mean(dim=1)))
