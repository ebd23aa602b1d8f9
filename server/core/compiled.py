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
the batch size, the frames per sample and the token split, for batches of one split only.  The batch sizes
compiled are `max_batch` and the powers of two below it; a batch of another size is padded to one or runs as
several (`batch_pieces`).  Compiling one key takes 15-40 s on 2 vCPUs and a model has about a hundred
levels, so nothing is compiled up front: once `hits` batches of a key have run eagerly, a background thread
has a child process compile it (tracing for export swaps in process-wide modes, which would catch the
serving threads' operations), and eager serves the key meanwhile.  The compiled package goes to a directory
named after what else fixes the code (checkpoint digest, dtype, PyTorch version, CPU instruction set): a
restart, or another worker process, loads it in milliseconds, and start-up loads the newest packages
already there.  At most `max_plans` are kept loaded, the least recently used dropped first.  A key whose
export, compilation or load fails runs eagerly from then on (logged once).  Only models of at most
`MAX_GFLOPS` an image are compiled.  A loaded package runs with the interpreter lock released
(`AotiModel`).

Every compiled forward runs one product per expert (`plan_runs` with no cost per product): runs of experts
at full width with masks exist to save per-operation cost, which compiled code no longer pays.  The
compiled forward computes the same function as the eager one; its logits differ by float rounding
(the order of the sums), as between two eager plans.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
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
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mone.model import MoNE, gflops, realised_capacity
from mone.model.checkpoint import load_checkpoint, save_checkpoint

# The same keys, outputs and batch sizes as captured CUDA graphs.
from mone.server.core.capture import Key, Outputs, capture_sizes

log = logging.getLogger("mone.compiled")

Compile = Callable[[MoNE, Key, Path], None]  # writes the package of a key to the path
Load = Callable[[Path, MoNE], Callable[[Tensor], Outputs]]

HITS = 3  # eager batches of a key before it is compiled
COMPILE_TIMEOUT_S = 900.0
CHILD_NICE = 19  # the compiling child's niceness: below the inference threads' (+10), so serving comes first
# Models of at most this many GFLOPs per image at capacity 1.0 are compiled.  Their forward is mostly
# per-operation cost, which compiling removes; a larger model's is mostly matrix products, which the eager
# path runs faster through oneDNN on packed weights: S/16 (4.6 GFLOPs) at one image took 83.5 / 56.3 / 44.4 ms
# compiled against 60.9 / 52.5 / 42.2 ms eager at capacity 1.0 / 0.5 / 0.25 (2 threads, 2 vCPUs).
MAX_GFLOPS = 1.0
MAX_PLANS = 32  # compiled forwards kept loaded
# Packages kept on disk (about 5 MB each with the library extracted beside it); beyond this the least
# recently loaded are removed after each build.  Mixed latency budgets or `degrade` serve many levels, each
# of several batch sizes.
MAX_ON_DISK = 128
# A batch whose size fills at least this share of the next compiled batch size is padded to it; a smaller one
# runs as the largest compiled size it fills, then the rest likewise (`batch_pieces`).
PAD_FILL = 0.75
RUNNERS = 4  # forwards of one compiled package that may run at once (a batch split over the streams)
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


class _Entry(ctypes.Structure):  # AOTInductorConstantMapEntry
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _handle(t: Tensor) -> int:
    """A new AtenTensorHandle (a heap `at::Tensor`) on `t`, as an address."""
    address = _capsule_pointer(torch._C._aoti.unsafe_alloc_void_ptr_from_tensor(t), None)
    assert address is not None
    return int(address)


def _tensor(address: int) -> Tensor:
    """The tensor of an AtenTensorHandle, which is freed with it."""
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(_capsule_new(address, None, None))


class AotiModel:
    """A compiled package's model, run through AOTInductor's C interface (`aoti_runtime/interface.h`).

    Called through ctypes, the forward runs with the interpreter lock released, as an eager forward's
    operations do: PyTorch's own package loader holds it for the whole call, which stopped the event loop
    (accepting, decoding, answering) for every compiled batch.  The constants are the serving model's own
    parameters and buffers (`user managed`: no copy of the weights on disk or in memory); Inductor still
    writes small ones (a scalar, a vector of up to 8) into the code, so a package only runs the weights it
    was compiled from (`fingerprint` names them).  `runners` forwards of it may run at once (the streams
    of a split batch).
    """

    def __init__(self, path: Path, model: MoNE, runners: int = 1) -> None:
        lib = self._lib = ctypes.CDLL(str(_shared_object(path)))
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        self._run = lib.AOTInductorModelContainerRun
        self._run.argtypes = [vp, ctypes.POINTER(vp), size, ctypes.POINTER(vp), size, vp, vp]
        self._run.restype = ctypes.c_int32
        self._container = h = vp()
        ref = ctypes.byref
        self._check(lib.AOTInductorModelContainerCreateWithDevice(ref(h), size(runners), b"cpu", None))
        outputs, count = size(), size()
        self._check(lib.AOTInductorModelContainerGetNumOutputs(h, ref(outputs)))
        self._check(lib.AOTInductorModelContainerGetNumConstants(h, ref(count)))
        self._outputs = outputs.value
        state = {f"model.{k}": v for k, v in model.state_dict(keep_vars=False).items()}
        entries: list[_Entry] = []
        self._constants: list[int] = []  # handles this object owns (user-managed constants)
        for i in range(count.value):
            name, fqn, folded = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_bool()
            self._check(lib.AOTInductorModelContainerGetConstantName(h, size(i), ref(name)))
            self._check(lib.AOTInductorModelContainerGetConstantOriginalFQN(h, size(i), ref(fqn)))
            self._check(lib.AOTInductorModelContainerGetConstantFromFolded(h, size(i), ref(folded)))
            if folded.value:  # computed from the others at run time
                continue
            key = (fqn.value or b"").decode()
            if key not in state:
                self.close()
                raise RuntimeError(f"{path.name}: the model has no {key!r}")
            handle = _handle(state[key])
            self._constants.append(handle)
            entries.append(_Entry(name.value, handle))
        self._keep = state  # the constants' storage lives as long as this object
        pairs = (_Entry * len(entries))(*entries)
        self._check(
            lib.AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(
                h, pairs, size(len(entries)), ctypes.c_bool(False), ctypes.c_bool(True)
            )
        )

    def __call__(self, x: Tensor) -> Outputs:
        (address,) = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([x])  # stolen by the run
        inputs = (ctypes.c_void_p * 1)(_capsule_pointer(address, None))
        outputs = (ctypes.c_void_p * self._outputs)()
        self._check(self._run(self._container, inputs, 1, outputs, self._outputs, None, None))
        logits, experts = (_tensor(int(o or 0)) for o in outputs)
        return logits, experts

    def __del__(self) -> None:  # the last reference: no forward of it runs any more
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if self._container:
            self._lib.AOTInductorModelContainerDelete(self._container)
            self._container = ctypes.c_void_p()
        for handle in self._constants:
            _tensor(handle)  # freed
        self._constants = []

    def _check(self, code: int) -> None:
        if code != 0:
            message = ctypes.c_char_p()
            with contextlib.suppress(AttributeError):
                self._lib.AOTInductorGetLastError(ctypes.byref(message))
            raise RuntimeError(f"AOTInductor call failed ({code}): {(message.value or b'').decode()}")


def _shared_object(package: Path) -> Path:
    """The package's compiled library, extracted beside it once (`<key>.so`): loading the same file again
    (after the package was dropped from the loaded ones) maps it once."""
    so = package.with_suffix(".so")
    if so.exists() and so.stat().st_mtime >= package.stat().st_mtime:
        return so
    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise RuntimeError(f"{package.name}: {len(names)} libraries in the package, not one")
        fd, tmp = tempfile.mkstemp(prefix="tmp", suffix=".so", dir=package.parent)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(names[0]) as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, so)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return so


def aoti_load(path: Path, model: MoNE) -> Callable[[Tensor], Outputs]:
    """Load the package `path` to run on `model`'s parameters (`AotiModel`)."""
    return AotiModel(path, model, runners=RUNNERS)


def batch_pieces(n: int, sizes: Sequence[int]) -> list[int]:
    """The compiled batch sizes (`sizes`, ascending, from 1) that run a batch of `n` inputs of one split,
    in order: the smallest size that holds the rest when the rest fills at least `PAD_FILL` of it (it is
    padded), else the largest size the rest fills, then the rest likewise.  With sizes 1, 2, 4 and 8: 3 runs
    as 4, 5 as 4 + 1, 6 and 7 as 8, 9 as 8 + 1, 20 as 8 + 8 + 4; at most a quarter of a run is padding."""
    pieces: list[int] = []
    while n > 0:
        up = next((b for b in sizes if b >= n), None)
        if up is not None and n >= PAD_FILL * up:
            pieces.append(up)
            break
        down = max(b for b in sizes if b <= n)
        pieces.append(down)
        n -= down
    return pieces


class _Pieces:
    """A batch run as several compiled forwards, in order, each padded with zero inputs to its size (samples
    do not interact in the forward, and the padding's outputs are dropped)."""

    def __init__(self, runs: list[tuple[int, Callable[[Tensor], Outputs]]]) -> None:
        self.runs = runs

    def __call__(self, x: Tensor) -> Outputs:
        logits, experts, start = [], [], 0
        for size, fn in self.runs:
            part = x[start : start + size]
            n = int(part.shape[0])
            if n < size:
                part = torch.cat([part, part.new_zeros((size - n, *part.shape[1:]))])
            out = fn(part.contiguous())
            logits.append(out[0][:n])
            experts.append(out[1][:n])
            start += n
        if len(self.runs) == 1:
            return logits[0], experts[0]
        return torch.cat(logits), torch.cat(experts)


class CompiledPlans:
    """Compiled forwards of the keys served often enough, compiled in a background thread.

    Args:
        model: the serving model (eval mode, on the CPU).
        directory: where packages are kept, one folder per `fingerprint`.
        fingerprint: what fixes the code besides the key (`fingerprint`).
        max_batch: the largest compiled batch size; the powers of two below it are compiled too
            (`capture_sizes`), and a larger batch runs in pieces.
        hits: eager batches of a key before it is compiled.
        max_plans: compiled forwards kept loaded.
        max_on_disk: packages kept in the directory, the least recently loaded removed first.
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
        max_on_disk: int = MAX_ON_DISK,
        compile_fn: Compile | None = aoti_compile,
        load_fn: Load = aoti_load,
    ) -> None:
        self.model = model
        self.directory = directory / fingerprint
        self.max_batch = max_batch
        self.sizes = capture_sizes(max_batch)
        self.hits = hits
        self.max_plans = max_plans
        self.max_on_disk = max_on_disk
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

    def plan(self, x: Tensor, splits: Sequence[tuple[int, ...]]) -> list[Key] | None:
        """The keys a batch (B, T, C, H, W) of these splits runs as (`batch_pieces`), or None when it is not
        compiled (mixed splits)."""
        if any(s != splits[0] for s in splits[1:]):
            return None
        frames, split = int(x.shape[1]), tuple(splits[0])
        return [(b, frames, split) for b in batch_pieces(int(x.shape[0]), self.sizes)]

    def lookup(
        self, x: Tensor, splits: Sequence[tuple[int, ...]], count: bool = True
    ) -> Callable[[Tensor], Outputs] | None:
        """The compiled forward of this batch, or None (run it eagerly); with `count`, the batch counts
        towards compiling its keys (served batches do, warm-up and calibration do not)."""
        keys = self.plan(x, splits)
        if keys is None:
            return None
        found = {key: self._get(key, count) for key in dict.fromkeys(keys)}
        if any(fn is None for fn in found.values()):
            return None
        if len(keys) == 1 and keys[0][0] == x.shape[0]:
            return found[keys[0]]
        return _Pieces([(key[0], found[key]) for key in keys])  # type: ignore[misc]

    def _get(self, key: Key, count: bool) -> Callable[[Tensor], Outputs] | None:
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
        # Left by a process killed while compiling or extracting a library.
        for tmp in [*self.directory.glob(f"tmp*{SUFFIX}"), *self.directory.glob("tmp*.so")]:
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
        self._prune(keep=key)
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
            for made in (path, path.with_suffix(".so")):
                with contextlib.suppress(FileNotFoundError):
                    made.unlink()
            with self._lock:
                self._failed.add(key)
            return False
        for made in (path, path.with_suffix(".so")):  # loaded now: the newest for `preload` and `_prune`
            with contextlib.suppress(OSError):  # (the library no older than its package)
                os.utime(made)
        with self._lock:
            self._ready[key] = fn
            self._ready.move_to_end(key)
            while len(self._ready) > self.max_plans:
                self._ready.popitem(last=False)
        return True

    def _prune(self, keep: Key) -> None:
        """Remove the least recently loaded packages beyond `max_on_disk`, but not `keep` (just built) nor
        any loaded here.  A package another worker has loaded keeps running there (its library stays
        mapped), and is compiled again if it is served often again."""

        def loaded_at(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0

        packages = sorted(self.directory.glob(f"*{SUFFIX}"), key=loaded_at)
        with self._lock:
            ready = {*self._ready, keep}
        excess = len(packages) - self.max_on_disk
        for path in packages:
            if excess <= 0:
                break
            if path.name.startswith("tmp") or parse_key_name(path.name.removesuffix(SUFFIX)) in ready:
                continue
            for made in (path, path.with_suffix(".so")):
                with contextlib.suppress(FileNotFoundError):
                    made.unlink()
            excess -= 1


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
