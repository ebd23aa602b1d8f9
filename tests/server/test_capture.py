"""Captured forwards (server/core/capture.py): keying, padding, static buffers and the eager fallback, on the
CPU with a backend that replays a capture by running its forward again into the captured output tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from mone.model import MoNE, MoNEConfig, expert_counts
from mone.server.core.budget import Budget
from mone.server.core.capture import CapturedForward, Outputs, accounting, capture_sizes
from mone.server.core.request import InferRequest
from mone.server.core.runner import Runner
from tests.support.models import make_model


class FakeGraph:
    def __init__(self, fn: Callable[[], Outputs], out: Outputs) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        for static, new in zip(self.out, self.fn(), strict=True):
            static.copy_(new)


class FakeGraphs:
    """Captures by running the forward once; a replay runs it again on the static input and writes the
    static outputs, as a device graph would.  Records the model's full-width threshold during capture."""

    def __init__(self, model: MoNE, fail: bool = False) -> None:
        self.model, self.fail = model, fail
        self.captured: list[float] = []

    def capture(self, fn: Callable[[], Outputs]) -> tuple[FakeGraph, Outputs]:
        self.captured.append(self.model.full_width_rows)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()
        return FakeGraph(fn, out), out


def images(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1, 28, 28, generator=g)  # (B, T, C, H, W)


def eager(net: MoNE, x: Tensor, caps: list[float]) -> tuple[Tensor, Tensor]:
    with torch.inference_mode():
        out = net(x, capacity=caps)
    return out.logits, out.experts


def captured(
    net: MoNE, sizes: list[int] | None = None, **kwargs: object
) -> tuple[CapturedForward, FakeGraphs]:
    backend = FakeGraphs(net, fail=bool(kwargs.pop("fail", False)))
    return CapturedForward(net, backend, sizes or capture_sizes(8), **kwargs), backend  # type: ignore[arg-type]


def splits(cfg: MoNEConfig, caps: list[float]) -> list[tuple[int, ...]]:
    """The token split of each capacity, as planning hands them to the forward."""
    return [expert_counts(c, cfg.num_tokens, cfg.num_experts) for c in caps]


def run(cf: CapturedForward, x: Tensor, caps: list[float]) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
    with torch.inference_mode():
        return cf(x, splits(cf.cfg, caps))


def test_capture_sizes_pad_to_at_most_twice() -> None:
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert capture_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(1) == [1]
    net = make_model()
    cf, _ = captured(net, [1, 2, 4, 8])
    assert [cf.bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_plan_groups_by_token_split_and_cuts_large_groups() -> None:
    net = make_model()
    cfg = net.cfg
    cf, _ = captured(net, [1, 2, 4])
    caps = [1.0, 0.5, 1.0, 0.5, 1.0, 1.0, 1.0, 0.25]
    pieces = cf.plan(1, splits(cfg, caps))
    split = {c: expert_counts(c, cfg.num_tokens, cfg.num_experts) for c in (1.0, 0.5, 0.25)}
    assert [(p.key, p.rows) for p in pieces] == [
        ((4, 1, split[1.0]), [0, 2, 4, 5]),
        ((1, 1, split[1.0]), [6]),
        ((2, 1, split[0.5]), [1, 3]),
        ((1, 1, split[0.25]), [7]),
    ]
    # Capacities that floor to the same token split share a key.
    near = 0.5 + 1e-4
    assert expert_counts(near, cfg.num_tokens, cfg.num_experts) == split[0.5]
    assert [p.key for p in cf.plan(1, splits(cfg, [0.5, near]))] == [(2, 1, split[0.5])]


@pytest.mark.parametrize(
    "caps", [[1.0] * 3, [0.5] * 8, [0.25, 1.0, 0.5, 0.5, 1.0], [0.125] * 5 + [1.0] * 6], ids=str
)
def test_outputs_equal_the_eager_forward(caps: list[float]) -> None:
    net = make_model()
    cf, _ = captured(net, [1, 2, 4, 8])
    x = images(len(caps))
    logits, experts, splits = run(cf, x, caps)
    ref_logits, ref_experts = eager(net, x, caps)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(experts, ref_experts)
    cfg = net.cfg
    assert splits == [expert_counts(c, cfg.num_tokens, cfg.num_experts) for c in caps]
    assert cf.eager == 0
    assert cf.replays >= 1


def test_graphs_are_reused_and_stale_rows_do_not_leak() -> None:
    net = make_model()
    cf, backend = captured(net, [1, 2, 4, 8])
    run(cf, images(4, seed=1), [0.5] * 4)
    assert cf.captures == 1
    x = images(3, seed=2)  # pads to 4: the 4th static row still holds the previous batch's last image
    logits, experts, _ = run(cf, x, [0.5] * 3)
    assert cf.captures == 1
    assert cf.replays == 2
    ref_logits, ref_experts = eager(net, x, [0.5] * 3)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(experts, ref_experts)
    run(cf, images(5), [0.5] * 5)  # pads to 8: a new key
    assert cf.captures == 2
    split = cf.plan(1, splits(net.cfg, [0.5]))[0].key[2]
    assert sorted(cf.graphs) == [(4, 1, split), (8, 1, split)]


def test_a_group_larger_than_the_largest_size_runs_in_pieces() -> None:
    net = make_model()
    cf, _ = captured(net, [1, 2, 4])
    x = images(10)
    logits, _, _ = run(cf, x, [0.5] * 10)  # 4 + 4 + 2: the 4-graph replays twice in one batch
    assert cf.captures == 2
    assert cf.replays == 3
    torch.testing.assert_close(logits, eager(net, x, [0.5] * 10)[0], rtol=1e-5, atol=1e-5)


def test_capture_runs_one_product_per_expert_and_restores_the_threshold() -> None:
    net = make_model()
    net.full_width_rows = 1e9  # eagerly, every split would run at full width
    cf, backend = captured(net)
    run(cf, images(2), [0.5, 0.5])
    assert backend.captured == [0.0]
    assert net.full_width_rows == 1e9
    cf2, backend2 = captured(net, per_expert=False)
    run(cf2, images(2), [0.5, 0.5])
    assert backend2.captured == [1e9]


def test_a_failed_capture_runs_eagerly_and_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    net = make_model()
    cf, backend = captured(net, fail=True)
    x = images(3)
    for _ in range(2):
        logits, experts, _ = run(cf, x, [0.25] * 3)
        ref_logits, ref_experts = eager(net, x, [0.25] * 3)
        assert torch.equal(logits, ref_logits)  # the very same eager forward
        assert torch.equal(experts, ref_experts)
    assert len(backend.captured) == 1  # tried once for the key
    assert cf.eager == 2
    assert cf.captures == 0
    assert not cf.graphs
    assert "runs eagerly" in caplog.text
    assert net.full_width_rows != 0.0  # restored after the failure too


def test_no_backend_runs_everything_eagerly() -> None:
    net = make_model()
    cf = CapturedForward(net, None, [1, 2, 4])
    x = images(3)
    logits, _, _ = run(cf, x, [1.0, 0.5, 1.0])
    assert cf.eager == 2
    assert cf.replays == 0
    torch.testing.assert_close(logits, eager(net, x, [1.0, 0.5, 1.0])[0], rtol=1e-5, atol=1e-5)


def test_least_recently_used_graphs_are_dropped() -> None:
    net = make_model()
    cf, _ = captured(net, [1, 2, 4], max_graphs=2)
    for n in (1, 2, 1, 4):  # keys of size 1, 2, (1 again: now the most recent), 4
        run(cf, images(n), [1.0] * n)
    assert [k[0] for k in cf.graphs] == [1, 4]
    assert cf.captures == 3


def test_accounting_matches_the_model() -> None:
    net = make_model()
    for frames in (1, 3):
        caps = [1.0, 0.3, 0.125]
        x = torch.randn(3, frames, 1, 28, 28)
        with torch.inference_mode():
            out = net(x, capacity=caps)
        splits = [tuple(int(v) for v in row) for row in out.expert_counts.tolist()]
        capacity, counts, gf = accounting(net.cfg, splits, frames)
        assert torch.equal(capacity, out.capacity)
        assert torch.equal(counts, out.expert_counts)
        assert torch.equal(gf, out.gflops)


def test_runner_with_captured_forward_answers_as_the_eager_runner(checkpoint_dir: object) -> None:
    from mone.model import load_checkpoint

    ck = load_checkpoint(checkpoint_dir)  # type: ignore[arg-type]
    plain = Runner(ck, torch.device("cpu"))
    graphed = Runner(load_checkpoint(checkpoint_dir), torch.device("cpu"))  # type: ignore[arg-type]
    graphed.graphs = CapturedForward(graphed.model, FakeGraphs(graphed.model), capture_sizes(8))
    xs = list(images(5, seed=3))  # (T=1, C, H, W) each
    caps = [1.0, 0.25, 0.5, 1.0, 0.25]
    batch = [
        InferRequest(x, "image", Budget("capacity", c), top_k=3, routing=True)
        for x, c in zip(xs, caps, strict=True)
    ]
    a = plain.run(batch, splits(ck.config, caps))
    b = graphed.run(batch, splits(ck.config, caps))
    assert graphed.graphs.replays == 3
    for s, t in zip(a.samples, b.samples, strict=True):
        assert s.top_indices == t.top_indices
        assert s.realised == t.realised
        assert s.counts == t.counts
        assert s.gflops == t.gflops
        assert torch.equal(s.experts, t.experts)  # type: ignore[arg-type]
        torch.testing.assert_close(torch.tensor(s.logits), torch.tensor(t.logits), rtol=1e-5, atol=1e-5)


def test_graphs_only_on_cuda(checkpoint_dir: object) -> None:
    from mone.model import load_checkpoint

    runner = Runner(load_checkpoint(checkpoint_dir), torch.device("cpu"), cuda_graphs=True)  # type: ignore[arg-type]
    assert runner.graphs is None
    assert runner.describe()["cuda_graphs"] is False


def test_clips_key_by_frames() -> None:
    torch.manual_seed(0)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10, num_frames=4)).eval()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    cf, _ = captured(net, [1, 2])
    clips = torch.randn(2, 4, 1, 28, 28)
    logits, experts, _ = run(cf, clips, [0.5, 0.5])
    run(cf, images(2), [0.5, 0.5])
    assert sorted(k[1] for k in cf.graphs) == [1, 4]
    ref_logits, ref_experts = eager(net, clips, [0.5, 0.5])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(experts, ref_experts)
