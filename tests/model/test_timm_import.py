"""Conversion of timm ViT weights, checked against a forward written from timm's `VisionTransformer` layout.

The real-timm comparison (timm needs a torch/torchvision pair of its own) is `scripts/timm_parity.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mone.model.timm_import import from_timm, from_timm_state_dict, read_timm_weights


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # timm.models.vision_transformer.Attention.forward
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, patch)


class TimmLikeViT(nn.Module):
    """timm `VisionTransformer(global_pool='avg', class_token=False)`: same module names, same forward."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 64, depth: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(3, dim, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 7)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.fc_norm(x.mean(dim=1)))


@pytest.fixture
def timm_like() -> TimmLikeViT:
    torch.manual_seed(0)
    m = TimmLikeViT()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial LayerNorm affine and biases
    return m.eval()


def test_converted_model_reproduces_logits(timm_like: TimmLikeViT) -> None:
    net = from_timm(timm_like)
    assert (net.cfg.img_size, net.cfg.patch_size, net.cfg.dim, net.cfg.depth, net.cfg.heads) == (
        32,
        8,
        64,
        3,
        4,
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = timm_like(x)
        out = net(x, capacity=1.0)
    assert (out.logits - ref).abs().max().item() <= 1e-4
    with torch.no_grad():  # and it is a real MoNE: lower capacities run and differ
        assert not torch.allclose(net(x, capacity=0.5).logits, ref, atol=1e-3)


def test_class_token_models_are_refused(timm_like: TimmLikeViT) -> None:
    state = dict(timm_like.state_dict())
    state["cls_token"] = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="cls_token"):
        from_timm_state_dict(state, heads=4)


def test_missing_fc_norm_is_explained(timm_like: TimmLikeViT) -> None:
    state = {k: v for k, v in timm_like.state_dict().items() if not k.startswith("fc_norm")}
    with pytest.raises(ValueError, match="global_pool='avg'"):
        from_timm_state_dict(state, heads=4)


def test_weights_files_in_timm_layout_are_read(timm_like: TimmLikeViT, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm_like.state_dict().items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "vit.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = timm_like(x)
    for name in ("vit.safetensors", "vit.pth"):
        read = read_timm_weights(tmp_path / name)
        assert set(read) == set(state)
        net = from_timm_state_dict(read, heads=4)
        with torch.no_grad():
            assert (net(x, 1.0).logits - ref).abs().max().item() <= 1e-4, name


def test_pickled_objects_and_missing_files_are_refused(tmp_path: Path) -> None:
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        read_timm_weights(tmp_path / "module.pt")
    with pytest.raises(ValueError, match="no such file"):
        read_timm_weights(tmp_path / "absent.safetensors")


def test_other_class_count_gets_a_new_head(timm_like: TimmLikeViT) -> None:
    state = timm_like.state_dict()
    net = from_timm_state_dict(state, heads=4, num_classes=3)
    assert net.cfg.num_classes == 3
    assert net.head.weight.shape == (3, 64)
    assert net.head.weight.abs().sum().item() == 0.0  # zero-initialised, as for fine-tuning
    for i in range(3):
        assert torch.equal(net.blocks[i].mlp.fc1.weight, state[f"blocks.{i}.mlp.fc1.weight"])
    assert torch.equal(net.pos_embed, state["pos_embed"])
    same = from_timm_state_dict(state, heads=4, num_classes=7)  # the checkpoint's own count keeps its head
    assert torch.equal(same.head.weight, state["head.weight"])
