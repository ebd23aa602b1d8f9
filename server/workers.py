"""How many server processes to start, and how many intra-op threads each runs (`workers` 0: auto).

A forward of a small model is mostly per-operation work in Python: a few hundred matrix products, norms and
adds on a few dozen tokens.  Inside one process every such operation takes the interpreter lock, and so does
the event loop's HTTP handling; two forwards side by side (the inference streams, server/core/runner.py)
wait for each other at every operation.  Separate processes share nothing: on a CPU, a model this small runs
one process per core, each with one intra-op thread, and a lone request loses nothing by it, since one
thread is as fast as several at batch 1 on such a model.  A large model spends its time in arithmetic that
every core of one process shares, and a lone request needs them all: one process.

docs/deployment.md ("Sizing batch and replicas", item 0) has the figures behind the rule.  Nothing here
imports torch: the command line decides before uvicorn starts its workers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mone.model.checkpoint import CheckpointError, read_checkpoint_info
from mone.model.config import MoNEConfig
from mone.model.flops import gflops
from mone.server.config import Settings

# Dense GFLOPs of one image up to which a model counts as small: one process per core.  The shipped Mi/4
# has 0.12 (its batch-1 forward on 2 vCPUs is about 60 % fixed per-operation cost), S/16 4.6.
SMALL_MODEL_GFLOPS = 1.0
# The most processes `auto` starts: each holds its own copy of the runtime and the model (about 300 MB
# for Mi/4); set `workers` to go beyond.
MAX_AUTO_WORKERS = 8
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Processes:
    """The resolved process layout.

    Attributes:
        workers: server processes.
        threads: intra-op threads of each; None: torch's default.
        reason: one line on why, for the log.
    """

    workers: int
    threads: int | None
    reason: str


def usable_cpus(cgroup: Path = _CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a container's
    `--cpus`), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of the cgroup CPU quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None when unlimited
    or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def gpu_expected(device: str) -> bool:
    """Whether the model will run on a GPU: `device` names CUDA, or is auto on a host with the NVIDIA
    driver loaded (without importing torch)."""
    if device.startswith("cuda"):
        return True
    return device == "auto" and Path("/proc/driver/nvidia/version").exists()


def image_gflops(settings: Settings) -> float | None:
    """Dense GFLOPs of one image of the configured model, from its config alone (no weights are read);
    None when it cannot be read (loading will report why)."""
    try:
        if settings.random_init:
            cfg = MoNEConfig.from_variant(settings.random_variant, num_classes=settings.random_classes)
        else:
            cfg = MoNEConfig.from_dict(read_checkpoint_info(settings.checkpoint)["config"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None
    return gflops(cfg, 1.0, 1)


def resolve_processes(settings: Settings, cpus: int | None = None, gpu: bool | None = None) -> Processes:
    """`settings.workers` and `settings.threads` as set; with `workers` 0 (auto): on a CPU, one process per
    usable core (threads / process when `threads` is set; at most `MAX_AUTO_WORKERS`) for a model of at most
    `SMALL_MODEL_GFLOPS` an image, each with an equal share of the cores; else one process."""
    if settings.workers:
        return Processes(settings.workers, settings.threads, "set")
    cpus = usable_cpus() if cpus is None else cpus
    if gpu if gpu is not None else gpu_expected(settings.device):
        return Processes(1, settings.threads, "a GPU runs the model: one process")
    work = image_gflops(settings)
    if work is None or work > SMALL_MODEL_GFLOPS:
        size = "unknown" if work is None else f"{work:.2g} GFLOPs an image"
        return Processes(1, settings.threads, f"model {size}, above {SMALL_MODEL_GFLOPS:g}: one process")
    per = settings.threads or 1
    workers = max(1, min(MAX_AUTO_WORKERS, cpus // per))
    threads = settings.threads or max(1, cpus // workers)
    return Processes(
        workers,
        threads,
        f"model {work:.2g} GFLOPs an image, at most {SMALL_MODEL_GFLOPS:g}: one process per "
        f"{threads} of {cpus} usable CPUs",
    )
