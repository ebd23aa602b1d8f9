from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mone.model import MoNE, MoNEConfig, gflops, inference
from mone.model.capacity import expert_counts, realised_capacity
from mone.model.flops import count_flops
from mone.model.routing import Layout, expert_preferred_routing
from tests.model.reference import reference_forward
from tests.support.models import make_net

CAPS = [1.0, 0.9, 0.6, 0.5, 0.3, 0.25, 0.2, 0.125]
# How an inference forward runs a multi-expert split (`inference.plan_runs`): one product per expert, full
# width with masks, or adjacent experts merged into runs (the cost of a product in rows of work, between the
# two).
WAYS = {"split": 0.0, "full_width": math.inf, "runs": 20.0}


def images(n: int = 3, seed: int = 1, size: int = 28, chans: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("capacity", CAPS)
def test_grouped_forward_equals_masked_reference(net: MoNE, capacity: float, way: str) -> None:
    x = images()
    net.full_width_rows = WAYS[way]
    with torch.no_grad():
        out = net(x, capacity)
        ref = reference_forward(net, x, capacity)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.2])
def test_grouped_forward_equals_reference_for_clips(capacity: float, way: str) -> None:
    net = make_net(temporal_depth=2, num_frames=4)
    net.full_width_rows = WAYS[way]
    x = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            net(x, capacity).logits, reference_forward(net, x, capacity), atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("frames_per_chunk", [1, 2])
@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.2])
def test_inference_in_chunks_of_frames_equals_reference(
    net: MoNE, capacity: float, frames_per_chunk: int, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference runs each block a few frames at a time (the last chunk shorter); the chunks must add up
    to the whole, images and clips alike."""
    cfg = net.cfg
    monkeypatch.setattr(
        inference, "CHUNK_BYTES", frames_per_chunk * 4 * cfg.num_tokens * cfg.mlp_ratio * cfg.dim
    )
    monkeypatch.setattr(inference, "FULL_WIDTH_ROWS", WAYS[way])
    net.full_width_rows = WAYS[way]
    x = images(5)
    with torch.no_grad():
        torch.testing.assert_close(
            net(x, capacity).logits, reference_forward(net, x, capacity), atol=2e-5, rtol=1e-4
        )
    clip_net = make_net(temporal_depth=2, num_frames=3)
    clips = torch.randn(2, 3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            clip_net(clips, capacity).logits,
            reference_forward(clip_net, clips, capacity),
            atol=2e-5,
            rtol=1e-4,
        )


def test_nested_linear_at_full_width_equals_dense_linear(net: MoNE) -> None:
    blk = net.blocks[0]
    x = torch.randn(2 * 49, net.cfg.dim)
    D = net.cfg.dim
    with torch.no_grad():
        full = blk.forward_nested(x.clone(), Layout(2, (49,), (D,)), None)
        h = blk.norm1(x.view(2, 49, D))
        qkv = (
            F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
            .view(2, 49, 3, 4, D // 4)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(2, 49, D)
        z = x.view(2, 49, D) + blk.attn.proj(a)
        dense = z + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(z))))
    torch.testing.assert_close(full.view(2, 49, D), dense, atol=1e-5, rtol=1e-5)


def test_capacity_one_is_the_dense_vit() -> None:
    """alpha starts at 0, so at capacity 1.0 MoNE is exactly the ViT on the same weights."""
    net = make_net(alpha=0.0, temporal_depth=0)
    x = images()
    with torch.no_grad():
        tok = net.embed(x)
        for blk in net.blocks:
            tok = blk(tok)
        dense = net.head(net.fc_norm(tok.mean(1)))
        torch.testing.assert_close(net(x, 1.0).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", CAPS)
def test_tokens_per_expert(net: MoNE, capacity: float) -> None:
    with torch.no_grad():
        out = net(images(), capacity)
    want = expert_counts(capacity, 49)
    for b in range(3):
        assert tuple(out.expert_counts[b].tolist()) == want
        hist = torch.bincount(out.experts[b, 0].long(), minlength=4)
        assert tuple(hist.tolist()) == want


def test_larger_experts_pick_their_top_tokens_first() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 49, 4, generator=g).softmax(-1)
    counts = expert_counts(0.4, 49)
    experts = expert_preferred_routing(probs, counts)
    free = torch.ones(5, 49, dtype=torch.bool)
    for j in (3, 2, 1):
        for f in range(5):
            mine = (experts[f] == j).nonzero().flatten()
            assert len(mine) == counts[j]
            cand = probs[f, :, j].masked_fill(~free[f], -1)
            assert set(cand.topk(counts[j]).indices.tolist()) == set(mine.tolist())
        free &= experts != j
    assert ((experts == 0) == free).all()  # the rest: smallest expert


def test_mixed_capacity_batch_equals_each_alone(net: MoNE) -> None:
    x = images(5)
    caps = torch.tensor([1.0, 0.3, 0.5, 0.3, 0.125])
    with torch.no_grad():
        batched = net(x, caps)
        for i in range(5):
            alone = net(x[i : i + 1], float(caps[i]))
            torch.testing.assert_close(batched.logits[i : i + 1], alone.logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(batched.experts[i], alone.experts[0])
            assert batched.gflops[i] == alone.gflops[0]


def test_forward_with_splits_equals_forward_with_capacities(net: MoNE) -> None:
    """The token splits a server plans once (`Level.counts`) give the very forward their capacities give."""
    x = images(5)
    caps = [1.0, 0.3, 0.5, 0.3, 0.125]
    cfg = net.cfg
    splits = [expert_counts(c, cfg.num_tokens, cfg.num_experts) for c in caps]
    with torch.no_grad():
        by_capacity = net(x, caps)
        by_split = net(x, splits=splits)
    assert torch.equal(by_split.logits, by_capacity.logits)
    assert torch.equal(by_split.experts, by_capacity.experts)
    assert torch.equal(by_split.expert_counts, by_capacity.expert_counts)
    assert torch.equal(by_split.capacity, by_capacity.capacity)
    assert torch.equal(by_split.gflops, by_capacity.gflops)
    assert by_split.requested.tolist() == [realised_capacity(s) for s in splits]


def test_bad_splits_are_a_clear_value_error(net: MoNE) -> None:
    n, e = net.cfg.num_tokens, net.cfg.num_experts
    good = (0,) * (e - 1) + (n,)
    with pytest.raises(ValueError, match="2 token splits for a batch of 3"):
        net(images(3), splits=[good, good])
    with pytest.raises(ValueError, match="sum to"):
        net(images(1), splits=[(1,) * e])
    with pytest.raises(ValueError, match="sum to"):
        net(images(1), splits=[(-1,) * (e - 1) + (n + e - 1,)])


def test_routing_with_underflowed_probabilities_keeps_every_count() -> None:
    """Router logits this far apart underflow to probability 0 in float32.  A token a larger expert took
    must not tie with those zeros (the -inf masking): each token goes to one expert, each expert gets
    exactly its count, and the larger expert keeps its pick, wherever that token sits."""
    N = 3
    logits = torch.full((N, N, 3), -200.0)
    logits[..., 0] = 0.0
    for f in range(N):
        logits[f, f, 2] = 200.0  # frame f: the largest expert wants token f; nobody wants expert 1
    probs = logits.softmax(-1)
    assert (probs[..., 1] == 0).all()  # expert 1's candidates all tie at 0
    counts = (0, 2, 1)
    experts = expert_preferred_routing(probs, counts)
    for f in range(N):
        assert experts[f, f] == 2, experts[f]
        assert tuple(torch.bincount(experts[f], minlength=3).tolist()) == counts, experts[f]
    # The same on frames where most probabilities underflow.
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(6, 49, 4, generator=g) * 300).softmax(-1)
    assert (probs == 0).float().mean() > 0.5
    counts4 = expert_counts(0.4, 49)
    experts = expert_preferred_routing(probs, counts4)
    for f in range(6):
        assert tuple(torch.bincount(experts[f], minlength=4).tolist()) == counts4


def test_an_image_is_a_one_frame_clip_through_the_same_weights() -> None:
    """An image is a one-frame clip: it matches the independent reference of a one-frame clip, the temporal
    transformer acts on it, and a clip's frames are encoded exactly as images are, each on its own."""
    net = make_net(temporal_depth=1, num_frames=4)
    x = images()
    with torch.no_grad():
        image = net(x, 0.4).logits
        torch.testing.assert_close(image, reference_forward(net, x.unsqueeze(1), 0.4), atol=2e-5, rtol=1e-4)
        net.temporal_blocks[0].mlp.fc2.bias.add_(
            torch.randn(net.cfg.dim, generator=torch.Generator().manual_seed(6))
        )
        assert not torch.allclose(net(x, 0.4).logits, image, atol=1e-3)
    # Without a temporal transformer a clip's logits are the head of its frames' mean image features.
    flat = make_net(temporal_depth=0, num_frames=4)
    clip = torch.randn(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = flat(clip, 0.4).logits
        for b in range(2):
            frames, _, _ = flat.forward_features(clip[b].unsqueeze(1), [0.4] * 4)  # 4 one-frame clips
            torch.testing.assert_close(whole[b], flat.forward_head(frames.mean(0)), atol=1e-5, rtol=1e-5)


def test_clip_frames_are_routed_separately() -> None:
    net = make_net()
    clip = torch.randn(2, 8, 1, 28, 28)
    with torch.no_grad():
        out = net(clip, 0.3)
    assert out.experts.shape == (2, 8, 49)
    for f in range(8):
        assert tuple(torch.bincount(out.experts[0, f].long(), minlength=4).tolist()) == expert_counts(0.3, 49)


@pytest.mark.parametrize("capacity", [1.0, 0.75, 0.5, 0.25, 0.125])
@pytest.mark.parametrize("frames", [0, 8])
def test_analytic_flops_match_counter(capacity: float, frames: int) -> None:
    """What the split forward executes is the analytic count (full width executes dense products)."""
    net = make_net()
    net.full_width_rows = 0.0
    x = torch.randn(1, 1, 28, 28) if frames == 0 else torch.randn(1, frames, 1, 28, 28)
    with torch.no_grad():
        counted = count_flops(lambda: net(x, capacity))
        out = net(x, capacity)
    analytic = gflops(net.cfg, capacity, max(frames, 1)) * 1e9
    # Equal, not close: the analytic count is exact (up to float rounding of the sum).
    assert counted == round(analytic)
    # What the forward reports is what the counter measured.
    assert round(out.gflops[0].item() * 1e9) == counted


def test_flops_shrink_with_capacity() -> None:
    cfg = MoNEConfig.from_variant("S/16")
    dense, half, quarter = (gflops(cfg, c) for c in (1.0, 0.5, 0.25))
    assert dense == pytest.approx(9.2, rel=0.05)  # 4.6 GMACs for ViT-S/16 (docs/model.md section 3.2)
    assert 1.8 < dense / half < 1.95
    assert 3.0 < dense / quarter < 3.4


def test_capacity_validation(net: MoNE) -> None:
    with pytest.raises(ValueError, match="capacity"):
        net(images(), 0.05)
    with pytest.raises(ValueError, match="shape"):
        net(images(), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="frames of shape"):
        net(torch.randn(1, 3, 28, 28), 0.5)


def _nan_pixels() -> torch.Tensor:
    x = images()
    x[1, 0, 5, 7] = float("nan")
    return x


def _inf_clip() -> torch.Tensor:
    x = torch.randn(2, 3, 1, 28, 28)
    x[0, 2, 0, 0, 0] = float("inf")
    return x


BAD_CALLS = {
    "capacity True": (images, True, "capacity must be a number"),
    "capacity False": (images, False, "capacity must be a number"),
    "capacity '0.5'": (images, "0.5", "capacity must be a number.*str '0.5'"),
    "capacity b'1'": (images, b"1", "capacity must be a number.*bytes"),
    "capacity None": (images, None, "capacity must be a number.*NoneType"),
    "capacity dict": (images, {"capacity": 0.5}, "capacity must be a number"),
    "a 0-d string array": (images, np.array("0.5"), "capacity must be a finite number, got str"),
    "capacities with a string": (images, [0.5, "0.5", 1.0], "capacity must be a finite number, got str"),
    "capacities with a bool": (images, [0.5, True, 1.0], "capacity must be a finite number, got bool"),
    "capacities with None": (images, [0.5, None, 1.0], "capacity must be a finite number, got NoneType"),
    "capacity NaN": (images, float("nan"), "capacity must be a finite number"),
    "bool tensor": (images, torch.tensor([True, True, False]), "dtype torch.bool"),
    "NaN tensor": (images, torch.tensor([0.5, float("nan"), 1.0]), "finite number"),
    "capacity below the floor": (images, 0.1, r"outside \[0.125, 1\]"),
    "empty batch": (lambda: torch.zeros(0, 1, 28, 28), 0.5, "empty batch"),
    "empty batch of clips": (lambda: torch.zeros(0, 4, 1, 28, 28), 0.5, "empty batch"),
    "zero frames": (lambda: torch.zeros(2, 0, 1, 28, 28), 0.5, "at least one frame"),
    "NaN pixels": (_nan_pixels, 0.5, "NaN or infinite"),
    "infinite pixels in a clip": (_inf_clip, 0.5, "NaN or infinite"),
    "integer pixels": (lambda: torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 0.5, "floating-point tensor"),
    "a list for x": (lambda: [[0.0] * 28] * 28, 0.5, "floating-point tensor, got list"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_a_clear_value_error(net: MoNE, case: str) -> None:
    make_x, capacity, says = BAD_CALLS[case]
    with torch.no_grad(), pytest.raises(ValueError, match=says):
        net(make_x(), capacity)


@pytest.mark.parametrize(
    "capacity",
    [
        0.5,
        1,
        np.float32(0.5),
        np.float64(0.25),
        np.array(0.5),
        [0.5, 1, 0.25],
        (0.5, 0.5, 0.5),
        np.array([0.5, 1.0, 0.25]),
    ],
    ids=["float", "int", "np.float32", "np.float64", "0-d ndarray", "list", "tuple", "ndarray"],
)
def test_numbers_of_any_real_type_are_capacities(net: MoNE, capacity: object) -> None:
    """The validation refuses what is not a number, and still takes numbers of other types."""
    x = images()
    expected = [float(c) for c in np.broadcast_to(np.asarray(capacity, dtype=np.float64), (3,))]
    with torch.no_grad():
        out = net(x, capacity)  # type: ignore[arg-type]
        ref = net(x, torch.tensor(expected))
    assert out.requested.tolist() == expected
    assert torch.equal(out.logits, ref.logits)


def test_gradients_reach_router_and_alpha() -> None:
    net = make_net().train()
    out = net(images(4), torch.tensor([0.3, 0.5, 1.0, 0.3]))
    F.cross_entropy(out.logits, torch.tensor([1, 2, 3, 4])).backward()
    assert net.router.proj.weight.grad is not None
    assert net.router.proj.weight.grad.abs().sum() > 0
    assert net.alpha.grad is not None
    assert net.alpha.grad.abs() > 0
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("temporal"))


def test_alpha_is_clamped_but_keeps_learning() -> None:
    net = make_net(alpha=-0.5)
    with torch.no_grad():
        assert net.mlp_alpha().item() == 0.0  # forward value clamped to [0, 1)
        net.alpha.fill_(3.0)
        assert net.mlp_alpha().item() < 1.0
        net.alpha.fill_(-0.5)
    out = net.train()(images(2), 0.5)
    out.logits.sum().backward()
    assert net.alpha.grad is not None
    assert net.alpha.grad.abs() > 0  # a plain clamp would give 0 here, and alpha could never come back


def test_train_and_eval_paths_agree() -> None:
    net = make_net()
    x = images()
    with torch.no_grad():
        a = net(x, 0.3).logits
    b = net(x, 0.3).logits  # autograd path (out-of-place residual adds)
    torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["Mi/4", "Ti/16", "S/16", "B/16", "L/16"])
def test_variants_build(variant: str) -> None:
    cfg = MoNEConfig.from_variant(variant, img_size=32 if variant != "Mi/4" else 28, depth=1)
    net = MoNE(cfg).eval()
    x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert net(x, 0.5).logits.shape == (1, cfg.num_classes)
    assert cfg.expert_dims == tuple(cfg.dim // 2**k for k in (3, 2, 1, 0))


@pytest.mark.parametrize("counts", [(40, 9, 0, 0), (0, 20, 29, 0), (10, 0, 0, 39)])
def test_runs_of_experts_with_unused_ones_between_equal_the_reference(counts: tuple) -> None:
    net = make_net(temporal_depth=0)
    x = images(2)
    with torch.no_grad():
        probs = net.router(net.embed(x))
        experts = expert_preferred_routing(probs, counts)
        want = reference_forward(net, x, 0.5, experts=experts)
        for rows in (0.0, 20.0, 1e4, math.inf):
            net.full_width_rows = rows
            tok = net.embed(x)
            pooled, got = net.encode_frames(tok, counts)
            assert torch.equal(got, experts)
            logits = net.forward_head(net.fc_norm(pooled))
            torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("capacity", [1.0, 0.125])
def test_routing_of_a_single_expert_split_sends_every_token_there(capacity: float) -> None:
    probs = torch.rand(3, 49, 4, generator=torch.Generator().manual_seed(1)).softmax(-1)
    counts = expert_counts(capacity, 49)
    experts = expert_preferred_routing(probs, counts)
    assert experts.dtype == torch.long
    assert torch.equal(experts, torch.full((3, 49), counts.index(49)))


def test_block_parameters_keep_the_timm_names(net: MoNE) -> None:
    """Checkpoints (ours and timm's) load by these names."""
    names = [k.removeprefix("blocks.0.") for k in net.state_dict() if k.startswith("blocks.0.")]
    assert names == [
        f"{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ]
