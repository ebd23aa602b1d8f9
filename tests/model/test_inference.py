"""The fast inference forward (model/inference.py) against the readable forward of model/vit.py.

Without autograd the model runs model/inference.py; with autograd it runs the readable forward that training
uses.  Both must compute the same function, whichever way the inference forward cuts a split into runs of
experts and however many frames it runs at a time.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from mone.model import MoNE, inference
from mone.model.capacity import expert_counts, realised_capacity
from mone.model.inference import _product_cost, calibrate_full_width, plan_runs
from tests.support.models import make_net

# How an inference forward runs a multi-expert split: one product per expert, full width with masks, or
# adjacent experts merged into runs (the cost of a product in rows of work, between the two).
WAYS = {"split": 0.0, "full_width": math.inf, "runs": 20.0}

# (batch, frames): images (frames 0) and clips, one sample and several.
INPUTS = {"image": (1, 0), "images": (3, 0), "clip": (1, 3), "clips": (2, 3)}


def _input(name: str) -> torch.Tensor:
    batch, frames = INPUTS[name]
    shape = (batch, 1, 28, 28) if frames == 0 else (batch, frames, 1, 28, 28)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(batch + 10 * frames))


@pytest.fixture(scope="module")
def clip_net() -> MoNE:
    return make_net(temporal_depth=2, num_frames=3)


@pytest.fixture(params=["addmm", "packed"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Products as `addmm` on weight views, or every product through oneDNN on packed weights."""
    if request.param == "packed":
        assert inference.packing_available()  # x86 and Arm builds of PyTorch have oneDNN
        monkeypatch.setattr(inference, "PACKED", True)
        monkeypatch.setattr(inference, "PACK_MIN_MACS", 0)
    else:
        monkeypatch.setattr(inference, "PACKED", False)
    return str(request.param)


@pytest.mark.parametrize("chunk", ["whole", "one frame"])
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("capacity", [1.0, 0.6, 0.3, 0.125])
@pytest.mark.parametrize("inputs", INPUTS)
def test_inference_forward_equals_the_readable_forward(
    clip_net: MoNE,
    inputs: str,
    capacity: float,
    way: str,
    chunk: str,
    kernels: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = clip_net.eval()
    if chunk == "one frame":
        cfg = net.cfg
        monkeypatch.setattr(inference, "CHUNK_BYTES", 4 * cfg.num_tokens * cfg.mlp_ratio * cfg.dim)
    net.full_width_rows = WAYS[way]
    x = _input(inputs)
    with torch.no_grad():
        fast = net(x, capacity)
    with torch.enable_grad():
        readable = net(x, capacity)
    torch.testing.assert_close(fast.logits, readable.logits.detach(), atol=2e-5, rtol=1e-4)
    assert torch.equal(fast.experts, readable.experts)
    assert torch.equal(fast.expert_counts, readable.expert_counts)


@pytest.mark.parametrize("way", WAYS)
def test_inference_forward_equals_the_readable_forward_at_mixed_capacities(
    clip_net: MoNE, way: str, kernels: str
) -> None:
    net = clip_net.eval()
    net.full_width_rows = WAYS[way]
    x = _input("clips").repeat(2, 1, 1, 1, 1)
    caps = torch.tensor([1.0, 0.3, 0.5, 0.125])
    with torch.no_grad():
        fast = net(x, caps)
    readable = net(x, caps)
    torch.testing.assert_close(fast.logits, readable.logits.detach(), atol=2e-5, rtol=1e-4)
    assert torch.equal(fast.experts, readable.experts)


def test_the_dense_block_at_inference_equals_the_readable_block(clip_net: MoNE, kernels: str) -> None:
    blk = clip_net.temporal_blocks[0]
    z = torch.randn(2, 3, clip_net.cfg.dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fast = blk(z)
    torch.testing.assert_close(fast, blk(z).detach(), atol=1e-5, rtol=1e-5)


def test_packed_copies_are_made_once_and_remade_when_the_weights_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inference, "PACKED", True)
    monkeypatch.setattr(inference, "PACK_MIN_MACS", 0)
    net, other = make_net().eval(), make_net(seed=1).eval()
    fc1 = net.blocks[0].fc1
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net(x, 0.5)
        first = dict(inference._PACKS[fc1])
        net(x, 0.5)
        assert all(inference._PACKS[fc1][key][2] is packed for key, (_, _, packed) in first.items())  # reused
        assert len(first) > 1  # one copy per width in use
        net.load_state_dict(other.state_dict())  # in place: the same storage, a new version
        fast = net(x, 0.5)
    readable = net(x, 0.5)
    torch.testing.assert_close(fast.logits, readable.logits.detach(), atol=2e-5, rtol=1e-4)
    assert all(inference._PACKS[fc1][key][2] is not packed for key, (_, _, packed) in first.items())


def test_only_products_large_enough_run_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "PACKED", True)
    monkeypatch.setattr(inference, "PACK_MIN_MACS", 64 * 32 * 16)
    layer = torch.nn.Linear(32, 16)
    small, large = torch.randn(63, 32), torch.randn(64, 32)
    with torch.no_grad():
        torch.testing.assert_close(inference.linear(small, layer), layer(small))
        assert layer not in inference._PACKS
        torch.testing.assert_close(
            inference.linear(large, layer, gelu=True), torch.nn.functional.gelu(layer(large))
        )
        assert list(inference._PACKS[layer]) == [(32, 16)]
    monkeypatch.setattr(inference, "PACKED", False)
    assert not inference.packs(large, 32, 16)


def test_plans_take_the_cheapest_runs(net: MoNE) -> None:
    counts = expert_counts(0.25, 49)  # (25, 16, 7, 1): widths 16, 32, 64, 128
    assert counts == (25, 16, 7, 1)
    net.full_width_rows = 0.0
    assert plan_runs(net, 1, counts) == ((3,), (2,), (1,), (0,))  # products cost nothing: one per expert
    net.full_width_rows = math.inf
    assert plan_runs(net, 1, counts) == ((3, 2, 1, 0),)  # products cost everything: one at full width
    net.full_width_rows = 20.0
    # Rows of full-width work, 20 per product: {128, 64} at 128 and {32, 16} at 32 cost 2*20 + 8 + 41/4.
    assert plan_runs(net, 1, counts) == ((3, 2), (1, 0))
    assert plan_runs(net, 64, counts) == ((3,), (2,), (1,), (0,))  # a large batch: FLOPs decide
    assert plan_runs(net, 1, expert_counts(1.0, 49)) == ((3,),)
    assert plan_runs(net, 1, expert_counts(0.125, 49)) == ((0,),)


def test_calibrate_full_width_sets_a_threshold_within_the_measured_sizes(net: MoNE) -> None:
    counts = expert_counts(0.5, 49)
    saved_per_frame = (1.0 - realised_capacity(counts)) * 49 / 3
    rows = calibrate_full_width(net, batches=(1, 2, 4), repeats=1)
    assert net.full_width_rows == rows
    # Where full width wins at every size, the cost is at most four times what a product saves at the last.
    assert 0.0 <= rows <= 4.0 * 4 * saved_per_frame


def test_the_cost_of_a_product_is_solved_from_two_times() -> None:
    # a = 1 ms per row, C = 10 rows: 49 rows at full width take 59, in four products at capacity 0.5 64.5.
    assert _product_cost(59.0, 4 * 10 + 0.5 * 49, 49, 0.5, 4) == pytest.approx(10.0)
    assert _product_cost(59.0, 0.5 * 49, 49, 0.5, 4) == 0.0  # products cost nothing
    assert _product_cost(10.0, 50.0, 49, 0.5, 4) == math.inf  # the split is slower than any C explains


def test_a_split_must_win_by_the_margin(net: MoNE) -> None:
    """The timed forward is the caller's (a server times its streams side by side); with a margin, a split
    that wins narrowly counts as a loss and every size measured stays at full width."""
    keep = net.full_width_rows
    calls: list[float] = []

    def forward(x: torch.Tensor, capacity: float) -> None:
        calls.append(net.full_width_rows)
        time.sleep(0.010 if net.full_width_rows == math.inf else 0.008)  # the split 1.25x faster

    narrow = calibrate_full_width(net, batches=(1, 2), repeats=1, forward=forward)
    assert narrow < 1e6  # the split won: a finite threshold
    assert set(calls) == {math.inf, 0.0}  # both ways were timed through `forward`
    wide = calibrate_full_width(net, batches=(1, 2), repeats=1, forward=forward, margin=1.6)
    counts = expert_counts(0.5, net.cfg.num_tokens, net.cfg.num_experts)
    groups = sum(1 for k in counts if k > 0)
    saved = (1 - realised_capacity(counts)) * net.cfg.num_tokens / (groups - 1)
    # Full width won at every size measured: the cost that reproduces the times at the last size (the split's
    # times the margin), 10 ms against 8 * 1.6, within one to four times what a product saves there.
    solved = _product_cost(0.010, 0.008 * 1.6, 2 * 49, realised_capacity(counts), groups)
    assert saved * 2 < solved < 4 * saved * 2
    assert wide == pytest.approx(solved, rel=0.15)
    assert wide > narrow
    net.full_width_rows = keep


def test_the_margin_shrinks_with_the_share_of_overhead(net: MoNE) -> None:
    """A forward whose time is all arithmetic (proportional to the batch) needs no margin: the split that
    wins by 1.25x wins, even asked for 1.6x; one whose time is all overhead keeps the whole margin."""
    keep = net.full_width_rows

    def arithmetic(x: torch.Tensor, capacity: float) -> None:
        time.sleep(x.shape[0] * (0.004 if net.full_width_rows == math.inf else 0.0032))

    def overhead(x: torch.Tensor, capacity: float) -> None:
        time.sleep(0.010 if net.full_width_rows == math.inf else 0.008)

    assert inference.overhead_share(net, 1, repeats=1, forward=arithmetic) < 0.2
    assert inference.overhead_share(net, 1, repeats=1, forward=overhead) > 0.8
    split = calibrate_full_width(net, batches=(1, 2), repeats=1, forward=arithmetic, margin=1.6)
    full = calibrate_full_width(net, batches=(1, 2), repeats=1, forward=overhead, margin=1.6)
    saved = (1 - realised_capacity(expert_counts(0.5, 49))) * 49 / 3
    assert split <= 0.5 * saved  # the split won from the smallest size on
    assert saved * 2 <= full <= 4 * saved * 2  # full width won at every size measured
    net.full_width_rows = keep
