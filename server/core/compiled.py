"""The forward compiled ahead of time per (batch size, frames, token split) on the CPU, kept on disk.

On a CPU at a small batch much of an eager forward is per-operation cost: the interpreter, the dispatcher
and one pass over memory per elementwise operation.  A lower capacity splits a frame's tokens over several
experts, and one matrix product per expert is more operations, so eagerly a lone image costs about as much
at capacity 0.25 as at 1.0 (the masked full-width path of model/inference.py is the fastest eager plan
there, and it spends dense FLOPs).  Compiled by Inductor (`torch.export`, then AOTInductor), the forward of
one fixed split is one C++ function: the elementwise work is fused into the products' loops and nothing
runs between operations, so each expert's products cost their arithmetic and a lower capacity pays from one
image on (figures in docs/model.md, section 7.3).

A compiled forward holds fixed shapes, so, like a captured CUDA graph (server/core/capture.py), it is keyed by
the batch size, the frames per sample and the token split, for batches of one split only.  Compiling one
takes 15-40 s on 2 vCPUs and a model has about a hundred levels, so nothing is compiled up front: once
`hits` batches of a key have run eagerly, a background thread has a child process compile it (tracing for
export swaps in process-wide modes, which would catch the serving threads' operations), and eager serves
the key meanwhile.  The compiled package goes to a directory named after what else fixes the code
(checkpoint digest, dtype, PyTorch version, CPU instruction set): a restart, or another worker process,
loads it in milliseconds, and start-up loads the newest packages already there.  At most `max_plans` are
kept loaded, the least recently used dropped first.  A key whose export, compilation or load fails runs
eagerly from then on (logged once).  Only models of at most `MAX_GFLOPS` an image are compiled.

Every compiled forward runs one product per expert (`plan_runs` with no cost per product): runs of experts
at full width with masks exist to save per-operation cost, which compiled code no longer pays.  The
compiled forward computes the same function as the eager one; its logits differ by float rounding
(the order of the sums), as between two eager plans.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mone.model import MoNE, gflops, realised_capacity
from mone.model.checkpoint import load_checkpoint, save_checkpoint
from mone.server.core.capture import Key, Outputs  # the same keys and outputs as captured CUDA graphs

log = logging.getLogger("mone.compiled")

Compile = Callable[[MoNE, Key, Path], None]  # writes the package of a key to the path
Load = Callable[[Path, MoNE], Callable[[Tensor], Outputs]]

HITS = 3  # eager batches of a key before it is compiled
COMPILE_TIMEOUT_S = 900.0
CHILD_NICE = 10  # the compiling child's niceness above the server's
# Models of at most this many GFLOPs per image at capacity 1.0 are compiled.  Their forward is mostly
# per-operation cost, which compiling removes; a larger model's is mostly matrix products, which the eager
# path runs faster through oneDNN on packed weights: S/16 (4.6 GFLOPs) at one image took 83.5 / 56.3 / 44.4 ms
# compiled against 60.9 / 52.5 / 42.2 ms eager at capacity 1.0 / 0.5 / 0.25 (2 threads, 2 vCPUs).
MAX_GFLOPS = 1.0
MAX_PLANS = 32  # compiled forwards kept loaded
SUFFIX = ".pt2"
FORMAT = "aoti1"  # packages of code only, run on the serving model's weights


def compiler_available() -> str | None:
    """Why plans cannot be compiled here, or None when they can (AOTInductor needs a C++ compiler)."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({cxx!r} or 'g++') on PATH"
    try:
        import torch._inductor  # noqa: F401
    except ImportError as exc:  # pragma: no cover - every CPU build of torch 2.x has it
        return f"torch._inductor does not import: {exc}"
    return None


def default_directory() -> Path:
    """$XDG_CACHE_HOME/mone/compiled, else ~/.cache/mone/compiled."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mone" / "compiled"


def fingerprint(sha256: str | None, model: MoNE, dtype: torch.dtype) -> str:
    """What fixes a compiled forward besides its key: the weights (digest, or a hash of the parameters of an
    unsaved model), dtype, PyTorch version and the CPU's instruction set."""
    if sha256 is None:
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().float().numpy().tobytes())
        sha256 = h.hexdigest()
    parts = [FORMAT, sha256[:16], str(dtype).removeprefix("torch."), torch.__version__, cpu_capability()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - older builds
        return "cpu"


def key_name(key: Key) -> str:
    batch, frames, split = key
    return f"b{batch}-f{frames}-s{'_'.join(map(str, split))}"


def parse_key_name(name: str) -> Key | None:
    m = re.fullmatch(r"b(\d+)-f(\d+)-s(\d+(?:_\d+)*)", name)
    if m is None:
        return None
    return int(m[1]), int(m[2]), tuple(int(c) for c in m[3].split("_"))


class _Forward(nn.Module):
    """The model's forward of one uniform batch of one token split, as the module that is exported."""

    def __init__(self, model: MoNE, split: tuple[int, ...], batch: int) -> None:
        super().__init__()
        # A shallow copy planned with one product per expert (no cost per product); the caller's is as it was.
        self.model = copy.copy(model)
        self.model.full_width_rows = 0.0
        self.splits = [split] * batch

    def forward(self, x: Tensor) -> Outputs:
        # `MoNE.forward` without its checks of the input, which the eager forward makes (the serving code
        # runs a batch that fails them eagerly, for its error) and its accounting, made by the caller.
        capacities = [realised_capacity(s) for s in self.splits]
        features, experts, _ = self.model.forward_features(x, capacities, self.splits)
        return self.model.forward_head(features), experts


def aoti_compile(model: MoNE, key: Key, path: Path) -> None:
    """Export the forward of `key` and compile it with AOTInductor into the package `path`.

    Exporting swaps in process-wide tracing modes, which would catch any other thread's operations: a
    serving process compiles in a child process (`compile_in_child`)."""
    batch, frames, split = key
    cfg = model.cfg
    param = next(model.parameters())
    shape = (batch, frames, cfg.in_chans, cfg.img_size, cfg.img_size)
    x = torch.randn(shape, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        program = torch.export.export(_Forward(model, split, batch), (x,))
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            # Code only: a loaded package runs on the serving model's own weights (`aoti_load`).
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )


def compile_in_child(checkpoint: Path, sha256: str | None, timeout_s: float = COMPILE_TIMEOUT_S) -> Compile:
    """A `Compile` that runs `aoti_compile` in a child process (`python -m mone.server.core.compiled`) on the
    checkpoint directory `checkpoint` (pinned to `sha256` when given), at a lower CPU priority than serving
    and with one compile thread."""

    def run(model: MoNE, key: Key, path: Path) -> None:
        cmd = [sys.executable, "-m", "mone.server.core.compiled", str(checkpoint), key_name(key), str(path)]
        if sha256:
            cmd += ["--sha256", sha256]
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"compiling {key_name(key)} exited {done.returncode}: {tail}")

    return run


def aoti_load(path: Path, model: MoNE) -> Callable[[Tensor], Outputs]:
    """Load the package `path`, its constants being `model`'s own parameters and buffers: no copy of the
    weights on disk or in memory.  Inductor still writes small ones (a scalar, a vector of up to 8) into the
    code, so a package only runs the weights it was compiled from (`fingerprint` names them)."""
    compiled = torch._inductor.aoti_load_package(str(path))
    state = {f"model.{k}": v for k, v in model.state_dict(keep_vars=False).items()}
    wanted = compiled.get_constant_fqns()
    missing = [f for f in wanted if f not in state]
    if missing:
        raise RuntimeError(f"{path.name}: the model has no {missing[0]!r}")
    compiled.load_constants({f: state[f] for f in wanted}, check_full_update=True, user_managed=True)
    loader = compiled.loader
    lock = threading.Lock()  # one run at a time per package

    def run(x: Tensor) -> Outputs:
        with lock:
            logits, experts = loader.boxed_run([x])
        return logits, experts

    return run


class CompiledPlans:
    """Compiled forwards of the keys served often enough, compiled in a background thread.

    Args:
        model: the serving model (eval mode, on the CPU).
        directory: where packages are kept, one folder per `fingerprint`.
        fingerprint: what fixes the code besides the key (`fingerprint`).
        max_batch: batches of up to this size are compiled.
        hits: eager batches of a key before it is compiled.
        max_plans: compiled forwards kept loaded.
        compile_fn, load_fn: how a package is made and loaded (AOTInductor; tests pass others); with no
            compile_fn only packages already on disk are loaded (made elsewhere: no compiler here).
    """

    def __init__(
        self,
        model: MoNE,
        directory: Path,
        fingerprint: str,
        *,
        max_batch: int = 1,
        hits: int = HITS,
        max_plans: int = MAX_PLANS,
        compile_fn: Compile | None = aoti_compile,
        load_fn: Load = aoti_load,
    ) -> None:
        self.model = model
        self.directory = directory / fingerprint
        self.max_batch = max_batch
        self.hits = hits
        self.max_plans = max_plans
        self._compile, self._load = compile_fn, load_fn
        self._ready: OrderedDict[Key, Callable[[Tensor], Outputs]] = OrderedDict()
        self._seen: Counter[Key] = Counter()
        self._queued: set[Key] = set()
        self._failed: set[Key] = set()
        self._lock = threading.Lock()  # guards the dicts above between the serving and compiling threads
        self._jobs: queue.Queue[Key | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.compiled = 0  # packages compiled by this process
        self.compile_seconds = 0.0

    def key(self, x: Tensor, splits: Sequence[tuple[int, ...]]) -> Key | None:
        """The key of a batch (B, T, C, H, W) of these splits, or None when it is not compiled (mixed
        splits, or too large a batch)."""
        batch = int(x.shape[0])
        if batch > self.max_batch or any(s != splits[0] for s in splits[1:]):
            return None
        return batch, int(x.shape[1]), tuple(splits[0])

    def lookup(
        self, x: Tensor, splits: Sequence[tuple[int, ...]], count: bool = True
    ) -> Callable[[Tensor], Outputs] | None:
        """The compiled forward of this batch, or None (run it eagerly); with `count`, the batch counts
        towards compiling its key (served batches do, warm-up and calibration do not)."""
        key = self.key(x, splits)
        if key is None:
            return None
        with self._lock:
            fn = self._ready.get(key)
            if fn is not None:
                self._ready.move_to_end(key)
                return fn
            if not count or key in self._queued or key in self._failed:
                return None
            self._seen[key] += 1
            # Served often enough to compile, or already compiled by another process: load it.
            on_disk = self._path(key).exists()
            if not on_disk and (self._compile is None or self._seen[key] < self.hits):
                return None
            self._queued.add(key)
        self._jobs.put(key)
        self._start()
        return None

    def preload(self) -> int:
        """Load the newest `max_plans` packages already in the directory; how many loaded."""
        if not self.directory.is_dir():
            return 0
        for tmp in self.directory.glob(f"tmp*{SUFFIX}"):  # left by a process killed while compiling
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > COMPILE_TIMEOUT_S:
                    tmp.unlink()
        found = [(p, parse_key_name(p.name.removesuffix(SUFFIX))) for p in self.directory.glob(f"*{SUFFIX}")]
        keyed = sorted(((p, k) for p, k in found if k is not None), key=lambda pk: pk[0].stat().st_mtime)
        return sum(self._load_key(key, path) for path, key in keyed[-self.max_plans :])

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued key is compiled or failed; whether it finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._queued:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "directory": str(self.directory),
                "max_batch": self.max_batch,
                "loaded": len(self._ready),
                "queued": len(self._queued),
                "failed": len(self._failed),
                "compiled": self.compiled,
                "compile_seconds": round(self.compile_seconds, 1),
            }

    def ready_keys(self) -> list[Key]:
        with self._lock:
            return list(self._ready)

    def _path(self, key: Key) -> Path:
        return self.directory / f"{key_name(key)}{SUFFIX}"

    # -- the compiling thread ------------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._work, name="mone-compile", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (key := self._jobs.get()) is not None:
            path = self._path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Other worker processes compile the same keys: one builds, the others wait and load.
                with open(path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not path.exists():
                        self._build(key, path)
                self._load_key(key, path)
            except Exception:  # noqa: BLE001 - the key runs eagerly from now on
                log.exception("compiling the forward of %s failed; it runs eagerly", key_name(key))
                with self._lock:
                    self._failed.add(key)
            finally:
                with self._lock:
                    self._queued.discard(key)

    def _build(self, key: Key, path: Path) -> None:
        if self._compile is None:  # no compiler here: only keys found on disk are queued
            raise RuntimeError(f"{path.name} is not on disk and this process compiles none")
        start = time.perf_counter()
        fd, tmp = tempfile.mkstemp(suffix=SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            self._compile(self.model, key, Path(tmp))
            os.replace(tmp, path)  # atomic: another worker never loads half a package
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        seconds = time.perf_counter() - start
        self.compiled += 1
        self.compile_seconds += seconds
        log.info("compiled the forward of %s in %.1f s", key_name(key), seconds)

    def _load_key(self, key: Key, path: Path) -> bool:
        try:
            fn = self._load(path, self.model)
        except Exception:  # noqa: BLE001 - a broken package: removed (the next start compiles it again),
            # and this process runs the key eagerly
            log.warning("loading the compiled forward %s failed", path, exc_info=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with self._lock:
                self._failed.add(key)
            return False
        with self._lock:
            self._ready[key] = fn
            self._ready.move_to_end(key)
            while len(self._ready) > self.max_plans:
                self._ready.popitem(last=False)
        return True


def compiled_plans_for(
    model: MoNE,
    checkpoint: Path | None,
    sha256: str | None,
    dtype: torch.dtype,
    directory: str | None,
    max_batch: int,
) -> CompiledPlans | None:
    """The server's compiled plans, or None where they are off (the reason is logged): for models above
    `MAX_GFLOPS` an image, and for other dtypes than fp32.

    The child processes that compile load the model from `checkpoint`; a model with no checkpoint directory
    (a random one) is saved once into the plans' directory for them.  Without a C++ compiler, packages made
    elsewhere (same fingerprint) are still loaded from the directory."""
    if dtype != torch.float32:
        log.info("compiled plans are off: they are made for fp32, the model runs in %s", dtype)
        return None
    work = gflops(model.cfg, 1.0, 1)
    if work > MAX_GFLOPS:
        log.info(
            "compiled plans are off: an image is %.2g GFLOPs, above %g, and the eager forward's packed "
            "products are faster there (docs/model.md, section 7.3)",
            work,
            MAX_GFLOPS,
        )
        return None
    base = Path(directory) if directory else default_directory()
    key = fingerprint(sha256 or None, model, dtype)
    compile_fn: Compile | None = None
    reason = compiler_available()
    try:
        if reason is None and checkpoint is None:
            checkpoint = base / key / "model"
            if not (checkpoint / "config.json").exists():
                save_checkpoint(checkpoint, model)
            sha256 = None
        if reason is None and checkpoint is not None:
            source = checkpoint.parent if checkpoint.is_file() else checkpoint
            compile_fn = compile_in_child(source, sha256 or None)
        plans = CompiledPlans(model, base, key, max_batch=max_batch, compile_fn=compile_fn)
        n = plans.preload()
    except OSError as exc:
        log.warning("compiled plans are off: %s", exc)
        return None
    if reason is not None:
        log.warning("compiled plans are only loaded from %s, not made: %s", plans.directory, reason)
    if n:
        log.info("loaded %d compiled forwards from %s", n, plans.directory)
    return plans


def main(argv: list[str] | None = None) -> int:
    """The child process of `compile_in_child`: compile one key of a checkpoint into a package."""
    import argparse

    p = argparse.ArgumentParser(description="Compile the forward of one (batch, frames, split) key.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("key", help="b<batch>-f<frames>-s<k_1>_..._<k_E>")
    p.add_argument("out", type=Path, help="the package to write (.pt2)")
    p.add_argument("--sha256", help="the checkpoint's digest, as the server loaded it")
    args = p.parse_args(argv)
    key = parse_key_name(args.key)
    if key is None:
        p.error(f"not a key: {args.key!r}")
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)  # serving comes first
    torch.set_num_threads(1)
    ck = load_checkpoint(args.checkpoint, expected_sha256=args.sha256, allow_unverified=True)
    aoti_compile(ck.model.eval(), key, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
