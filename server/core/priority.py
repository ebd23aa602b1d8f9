"""CPU priority of the inference threads (docs/reliability.md row 24: liveness answers under a saturated CPU).

The event loop answers /healthz, /readyz, /metrics and admission; the model runs on the engine's worker
thread and torch's intra-op threads.  When inference saturates the cores, the loop would get only its fair
share of them, behind every busy intra-op thread.  On Linux the nice value is a per-thread attribute and a
thread inherits its creator's: raising it for the worker thread before its first torch op also lowers the
intra-op threads that torch's OpenMP runtime starts from there, and leaves the loop's thread untouched.  The
stream threads (server/core/runner.py) are set to the worker thread's value when they start.
Raising one's nice value needs no privilege; it only matters when something else wants the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("mone.priority")


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the calling thread's nice value (capped at 19); a no-op for 0 or off Linux."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: serve anyway
        log.warning("could not lower the inference thread's priority: %s", exc)


def set_thread_priority(nice: int | None) -> None:
    """Give the calling thread the nice value `nice` (None: leave it); it can only be raised without
    privilege, which is all that is asked here: threads started by the inference thread already have its."""
    if nice is None or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.warning("could not set a stream thread's priority: %s", exc)


def current_thread_nice() -> int | None:
    """The calling thread's nice value (Linux), else None."""
    return thread_nice(threading.get_native_id()) if sys.platform.startswith("linux") else None


def thread_nice(tid: int) -> int:
    """The nice value of thread `tid` of this process, read from /proc (Linux)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19 of proc(5); the name may hold spaces


def thread_ids() -> set[int]:
    """The native ids of this process's threads (Linux)."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}
