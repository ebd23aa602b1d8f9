"""Compiled forwards (server/core/compiled.py): when a key is compiled, that it is loaded, shared between
processes through the directory and kept within bounds, and that the compiled forward computes the eager one.

The bookkeeping tests stand in a "compiler" that writes a file and a "loader" that runs the eager model; the
test marked slow runs a server that compiles for real, with AOTInductor in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import Tensor

from mone.model import MoNE, expert_counts, load_checkpoint
from mone.server.core import compiled as cp
from mone.server.core.budget import Budget
from mone.server.core.compiled import CompiledPlans, Key, Outputs
from mone.server.core.request import InferRequest
from mone.server.core.runner import Runner
from tests.live_server import ROOT, free_port, server_env
from tests.support.media import png_bytes
from tests.support.models import make_checkpoint, make_net

CAN_COMPILE = cp.compiler_available() is None


def eager(path: Path, model: MoNE) -> Callable[[Tensor], Outputs]:
    split = cp.parse_key_name(path.name.removesuffix(cp.SUFFIX))
    assert split is not None

    def run(x: Tensor) -> Outputs:
        out = model(x, splits=[split[2]] * x.shape[0])
        return out.logits, out.experts

    return run


class FakeCompiler:
    """Writes the key's name into the package; `fail` keys raise."""

    def __init__(self, fail: set[Key] | None = None) -> None:
        self.built: list[Key] = []
        self.fail = fail or set()

    def __call__(self, model: MoNE, key: Key, path: Path) -> None:
        self.built.append(key)
        if key in self.fail:
            raise RuntimeError("no")
        path.write_text(cp.key_name(key))


def plans(tmp_path: Path, net: MoNE, compiler: FakeCompiler | None = None, **kw: object) -> CompiledPlans:
    return CompiledPlans(
        net,
        tmp_path,
        "fp",
        compile_fn=compiler or FakeCompiler(),
        load_fn=eager,
        **kw,  # type: ignore[arg-type]
    )


def image(batch: int = 1, frames: int = 1) -> Tensor:
    return torch.randn(batch, frames, 1, 28, 28)


SPLIT = expert_counts(0.25, 49, 4)


def test_a_key_is_compiled_after_hits_and_served_compiled(tmp_path: Path) -> None:
    net, compiler = make_net(), FakeCompiler()
    p = plans(tmp_path, net, compiler, hits=3)
    x = image()
    assert [p.lookup(x, [SPLIT]) for _ in range(3)] == [None, None, None]
    assert p.wait(10)
    fn = p.lookup(x, [SPLIT])
    assert fn is not None
    assert compiler.built == [(1, 1, SPLIT)]
    assert (tmp_path / "fp" / "b1-f1-s25_16_7_1.pt2").exists()
    with torch.inference_mode():
        assert torch.equal(fn(x)[0], net(x, splits=[SPLIT]).logits)
    assert p.describe()["loaded"] == 1
    assert p.describe()["compiled"] == 1
    p.close()


def test_calibration_batches_and_mixed_splits_are_not_compiled(tmp_path: Path) -> None:
    compiler = FakeCompiler()
    p = plans(tmp_path, make_net(), compiler, hits=1, max_batch=2)
    assert p.lookup(image(), [SPLIT], count=False) is None
    assert p.lookup(image(2), [SPLIT, expert_counts(1.0, 49, 4)]) is None  # mixed splits
    assert p.wait(10)
    assert compiler.built == []
    assert p.lookup(image(2), [SPLIT, SPLIT]) is None  # counted: the first hit compiles
    assert p.wait(10)
    assert compiler.built == [(2, 1, SPLIT)]
    p.close()


@pytest.mark.parametrize(
    ("n", "sizes", "pieces"),
    [
        (1, (1,), [1]),
        (3, (1, 2, 4, 8), [4]),
        (5, (1, 2, 4, 8), [4, 1]),
        (6, (1, 2, 4, 8), [8]),
        (7, (1, 2, 4, 8), [8]),
        (9, (1, 2, 4, 8), [8, 1]),
        (20, (1, 2, 4, 8), [8, 8, 4]),
        (3, (1,), [1, 1, 1]),
    ],
)
def test_a_batch_runs_as_compiled_sizes_padded_by_at_most_a_quarter(
    n: int, sizes: tuple[int, ...], pieces: list[int]
) -> None:
    assert cp.batch_pieces(n, sizes) == pieces
    assert sum(pieces) - n <= max(pieces) / 4
    assert plans(Path("unused"), make_net(), max_batch=8).sizes == [1, 2, 4, 8]
    assert plans(Path("unused"), make_net(), max_batch=6).sizes == [1, 2, 4, 6]


def test_a_batch_between_compiled_sizes_runs_padded_and_in_pieces(tmp_path: Path) -> None:
    """Batches of 3 (padded to 4) and 5 (4 + 1) count towards the sizes they run as, and once those are
    compiled run compiled, each sample's outputs those of the eager forward."""
    net, compiler = make_net(), FakeCompiler()
    p = plans(tmp_path, net, compiler, hits=1, max_batch=4)
    assert p.lookup(image(3), [SPLIT] * 3) is None
    assert p.wait(10)
    assert compiler.built == [(4, 1, SPLIT)]
    x = image(5)
    assert p.lookup(x, [SPLIT] * 5) is None  # 4 is ready, 1 is not yet
    assert p.wait(10)
    assert compiler.built == [(4, 1, SPLIT), (1, 1, SPLIT)]
    for batch in (image(3), x):
        n = batch.shape[0]
        fn = p.lookup(batch, [SPLIT] * n)
        assert fn is not None
        with torch.inference_mode():
            logits, experts = fn(batch)
            ref = net(batch, splits=[SPLIT] * n)
        assert logits.shape == ref.logits.shape
        torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(experts, ref.experts)
    p.close()


def test_a_key_that_fails_to_compile_runs_eagerly_from_then_on(tmp_path: Path) -> None:
    compiler = FakeCompiler(fail={(1, 1, SPLIT)})
    p = plans(tmp_path, make_net(), compiler, hits=1)
    p.lookup(image(), [SPLIT])
    assert p.wait(10)
    for _ in range(3):
        assert p.lookup(image(), [SPLIT]) is None
    assert p.wait(10)
    assert compiler.built == [(1, 1, SPLIT)]
    assert p.describe()["failed"] == 1
    assert not list((tmp_path / "fp").glob("*.pt2"))  # no half-written package is left
    p.close()


def test_a_package_another_process_made_is_loaded_without_compiling(tmp_path: Path) -> None:
    maker = plans(tmp_path, make_net(), hits=1)
    maker.lookup(image(), [SPLIT])
    assert maker.wait(10)
    maker.close()
    compiler = FakeCompiler()
    other = plans(tmp_path, make_net(), compiler, hits=100)
    assert other.lookup(image(), [SPLIT]) is None  # found on disk at the first batch: loaded, not built
    assert other.wait(10)
    assert other.lookup(image(), [SPLIT]) is not None
    assert compiler.built == []
    # Without a compiler, packages on disk are still loaded, and nothing else is queued.
    third = CompiledPlans(make_net(), tmp_path, "fp", compile_fn=None, load_fn=eager, hits=1)
    assert third.preload() == 1
    assert third.lookup(image(), [expert_counts(1.0, 49, 4)]) is None
    assert third.wait(1)
    assert third.describe()["queued"] == 0
    other.close()


def test_preload_keeps_the_newest_packages_within_the_bound(tmp_path: Path) -> None:
    folder = tmp_path / "fp"
    folder.mkdir()
    splits = [expert_counts(c, 49, 4) for c in (1.0, 0.5, 0.25)]
    for i, s in enumerate(splits):
        path = folder / f"{cp.key_name((1, 1, s))}{cp.SUFFIX}"
        path.write_text("x")
        os.utime(path, (1000 + i, 1000 + i))
    (folder / "not-a-key.pt2").write_text("x")
    p = plans(tmp_path, make_net(), max_plans=2)
    assert p.preload() == 2
    assert p.ready_keys() == [(1, 1, splits[1]), (1, 1, splits[2])]
    p.lookup(image(), [splits[0]])  # on disk: loaded, and the least recently used is dropped
    assert p.wait(10)
    assert len(p.ready_keys()) == 2
    assert (1, 1, splits[0]) in p.ready_keys()
    p.close()


def test_packages_beyond_the_disk_bound_go_least_recently_loaded_first(tmp_path: Path) -> None:
    folder = tmp_path / "fp"
    folder.mkdir()
    splits = [expert_counts(c, 49, 4) for c in (1.0, 0.5, 0.25, 0.125)]

    def package(split: tuple[int, ...]) -> Path:
        return folder / f"{cp.key_name((1, 1, split))}{cp.SUFFIX}"

    for i, split in enumerate(splits[:2]):  # made earlier; the first loaded longest ago
        package(split).write_text("x")
        package(split).with_suffix(".so").write_text("x")
        os.utime(package(split), (1000 + i, 1000 + i))
    p = plans(tmp_path, make_net(), hits=1, max_on_disk=2)
    p.lookup(image(), [splits[2]])  # compiled: three on disk, one too many
    assert p.wait(10)
    assert sorted(folder.glob(f"*{cp.SUFFIX}")) == sorted([package(splits[1]), package(splits[2])])
    assert not package(splits[0]).with_suffix(".so").exists()
    # Loaded here, a package stays whatever the bound.
    assert p.preload() == 2
    p.max_on_disk = 1
    p.lookup(image(), [splits[3]])
    assert p.wait(10)
    assert len(list(folder.glob(f"*{cp.SUFFIX}"))) == 3
    p.close()


def test_preload_removes_what_a_killed_compile_left(tmp_path: Path) -> None:
    folder = tmp_path / "fp"
    folder.mkdir()
    stale, fresh = folder / f"tmpold{cp.SUFFIX}", folder / f"tmpnew{cp.SUFFIX}"
    stale.write_text("")
    fresh.write_text("")  # another process may be compiling into it now
    old = time.time() - cp.COMPILE_TIMEOUT_S - 60
    os.utime(stale, (old, old))
    assert plans(tmp_path, make_net()).preload() == 0
    assert not stale.exists()
    assert fresh.exists()


def test_the_runner_serves_compiled_forwards_and_bad_input_eagerly(tmp_path: Path) -> None:
    """A batch whose key is compiled runs compiled, with the same accounting; one with NaN runs eagerly and
    gets the model's error, and a batch of mixed splits runs eagerly."""
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt"))
    runner = Runner(ckpt, torch.device("cpu"))
    calls: list[int] = []

    def counted(path: Path, model: MoNE) -> Callable[[Tensor], Outputs]:
        run = eager(path, model)
        return lambda x: (calls.append(x.shape[0]), run(x))[1]

    runner.compiled = CompiledPlans(
        runner.model, tmp_path, "fp", compile_fn=FakeCompiler(), load_fn=counted, hits=1, max_batch=2
    )
    runner.serving = True
    x = image()[0]

    def batch(*caps: float) -> list[InferRequest]:
        return [InferRequest(x, "image", Budget("capacity", c), top_k=3) for c in caps]

    eager_out = runner.run(batch(0.25), [SPLIT])
    assert runner.compiled.wait(10)
    compiled_out = runner.run(batch(0.25), [SPLIT])
    assert calls == [1]
    assert compiled_out.samples[0].logits == pytest.approx(eager_out.samples[0].logits, abs=1e-5)
    for field in ("realised", "counts", "gflops", "top_indices"):
        assert getattr(compiled_out.samples[0], field) == getattr(eager_out.samples[0], field)
    bad = [InferRequest(torch.full_like(x, float("nan")), "image", Budget("capacity", 0.25), top_k=3)]
    with pytest.raises(ValueError, match="NaN"):
        runner.run(bad, [SPLIT])
    runner.run(batch(0.25, 1.0), [SPLIT, expert_counts(1.0, 49, 4)])
    assert calls == [1]
    runner.close()


def test_key_names_and_fingerprints() -> None:
    key = (2, 8, (3, 0, 10, 36))
    assert cp.parse_key_name(cp.key_name(key)) == key
    assert cp.parse_key_name("b1-f1-s") is None
    net = make_net()
    a = cp.fingerprint("ab" * 32, net, torch.float32)
    assert a != cp.fingerprint("cd" * 32, net, torch.float32)
    assert a != cp.fingerprint("ab" * 32, net, torch.bfloat16)
    assert cp.fingerprint(None, net, torch.float32) != cp.fingerprint(None, make_net(seed=1), torch.float32)
    assert "/" not in a
    assert torch.__version__.replace("+", "_") in a


def test_off_for_other_dtypes_and_larger_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cp.compiled_plans_for(make_net(), None, None, torch.bfloat16, str(tmp_path), 1) is None
    on = cp.compiled_plans_for(make_net(), None, None, torch.float32, str(tmp_path), 1)
    assert on is not None
    on.close()
    monkeypatch.setattr(cp, "MAX_GFLOPS", 0.1)  # Mi/4 is 0.12 GFLOPs an image
    assert cp.compiled_plans_for(make_net(), None, None, torch.float32, str(tmp_path), 1) is None


# -- compiled for real ------------------------------------------------------------------------------------
QUERY = "/v1/classify?capacity=0.25&top_k=10&routing=true"
needs_compiler = pytest.mark.skipif(not CAN_COMPILE, reason="AOTInductor needs a C++ compiler")


@pytest.mark.slow
@needs_compiler
def test_a_server_compiles_what_it_serves_and_reports_it(tmp_path: Path) -> None:
    """A real server: single requests at one capacity get their forward compiled in a child process in the
    background; the compiled answers are the eager ones (every class's probability to float rounding, the
    same routing and accounting); a restart loads the package instead of compiling."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    env = server_env()
    env["MONE_COMPILED_PLANS"] = "true"
    env["MONE_COMPILE_DIR"] = str(tmp_path / "plans")
    body = png_bytes()

    def serve() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        port = free_port()
        cmd = [sys.executable, "-m", "mone.server", "--checkpoint", str(ckpt), "--port", str(port)]
        cmd += ["--workers", "1", "--threads", "1", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
            answers: list[dict[str, Any]] = []
            state: dict[str, Any] = {}
            deadline = time.monotonic() + 600
            with httpx.Client(base_url=base, timeout=30) as c:
                while time.monotonic() < deadline:
                    r = c.post(QUERY, content=body, headers={"content-type": "image/png"})
                    assert r.status_code == 200, r.text
                    answers.append(r.json())
                    state = c.get("/v1/models").json()["models"][0]["checkpoint"]["compiled_plans"]
                    if state["loaded"] >= 1 and len(answers) >= 6:
                        break
                    time.sleep(0.5 if state["queued"] else 0.05)
            return answers, state
        finally:
            proc.terminate()
            proc.wait(30)

    answers, state = serve()
    assert (state["loaded"], state["compiled"], state["failed"]) == (1, 1, 0), state
    first, last = answers[0], answers[-1]  # eager, then compiled
    eager_probs = {p["label"]: p["prob"] for p in first["top_k"]}
    compiled_probs = {p["label"]: p["prob"] for p in last["top_k"]}
    assert compiled_probs == pytest.approx(eager_probs, abs=1e-5)
    assert first["routing"] == last["routing"]
    assert first["served"] == last["served"]
    answers, state = serve()
    assert (state["loaded"], state["compiled"]) == (1, 0), state  # loaded at start-up, not compiled again
    (package,) = (tmp_path / "plans").glob(f"*/*{cp.SUFFIX}")
    assert_runs_without_the_interpreter_lock(package, load_checkpoint(ckpt).model.eval())


CALLS = 50


def assert_runs_without_the_interpreter_lock(package: Path, model: MoNE) -> None:
    """The package's forward, loaded in this process, computes the eager one, and while it runs another thread
    runs Python.  The switch interval is far longer than the test, so a thread that held the lock through
    its calls would let the main thread in only where it lets go between them: PyTorch's own loader let it
    look 8 times in 50 calls, at their edges.  Released, the lock is free for the whole of every call."""
    key = cp.parse_key_name(package.name.removesuffix(cp.SUFFIX))
    assert key is not None
    fn = cp.AotiModel(package, model)
    x = torch.randn(key[0], key[1], 1, 28, 28)
    with torch.inference_mode():
        logits, experts = fn(x)
        ref = model(x, splits=[key[2]] * key[0])
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(experts, ref.experts)
    inside = threading.Event()
    seen: list[bool] = []

    def calls() -> None:
        with torch.inference_mode():
            for _ in range(CALLS):
                inside.set()
                fn(x)
                inside.clear()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        thread = threading.Thread(target=calls)
        thread.start()
        while thread.is_alive():
            seen.append(inside.is_set())
            time.sleep(0.0002)  # lets the other thread in
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(seen) >= CALLS, f"the main thread ran {sum(seen)} times in {CALLS} compiled forwards"
    fn.close()
