"""Several worker processes behind one port: uvicorn's supervisor, with a listening socket per worker.

Every worker gets a socket of its own, all bound to the port with SO_REUSEPORT, and the kernel spreads new
connections evenly over them.  On one shared socket (uvicorn's way) whichever worker wakes first accepts
every connection waiting, and 16 keep-alive clients that connect at once could all land on one worker while
the other idles (measured: 315 against 443-554 req/s; bench/runs/2026-12-07-workers.md).

A worker that dies gets a fresh socket and its old one is closed: connections still queued on it are reset
(an error the client sees at once) instead of waiting for the replacement to load the model, and new ones go
to the other workers until the replacement listens.  A rolling restart (SIGHUP) hands each worker's socket
to its replacement, so nothing queued is dropped.  uvicorn's `Multiprocess` gives every worker the same
sockets and has no hook for this, so its two loops that start workers are repeated here with that change.
"""

from __future__ import annotations

import contextlib
import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process, logger


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening (its worker listens once it is
    ready)."""
    sock = _tcp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor(Multiprocess):
    """`config.workers` processes, each serving on a socket of its own (module docstring)."""

    def __init__(self, config: Config) -> None:
        # Without SO_REUSEPORT first: a port that another server (of any kind) listens on is refused, as one
        # worker's bind would refuse it, instead of being shared with it.
        with _tcp_socket(config.host) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((config.host, config.port))
            self.port = probe.getsockname()[1]  # the port picked when config.port is 0
        self.own = [reuse_port_socket(config.host, self.port) for _ in range(config.workers)]
        super().__init__(config, sockets=[])

    def init_processes(self) -> None:
        for sock in self.own:
            process = Process(self.config, [sock])
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                logger.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info("Child process [%s] died", process.pid)
            self.own[idx].close()
            self.own[idx] = reuse_port_socket(self.config.host, self.port)
            replacement = Process(self.config, [self.own[idx]])
            replacement.start()
            self.processes[idx] = replacement

    def restart_all(self) -> None:
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = Process(self.config, [self.own[idx]])
            new.start()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(
                        "New child process [%s] was not ready in time; keeping [%s].", new.pid, old.pid
                    )
                return
            old.terminate()
            old.join()
            self.processes[idx] = new


def supervise(config: Config) -> int:
    """Run the workers until shutdown.  The supervisor restarts a worker that dies while serving and stops
    when one fails to start (a bad checkpoint fails every worker alike); then this returns uvicorn's
    start-up failure code, with which one worker exits too, else 0."""
    try:
        supervisor = Supervisor(config)
    except OSError as exc:  # the port is taken, or the address is not ours
        logging.getLogger("uvicorn.error").error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return STARTUP_FAILURE
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else 0
