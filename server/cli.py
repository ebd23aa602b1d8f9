"""`mone-serve` / `python -m mone.server`: the command line mirrors `Settings` field by field.

Every `--flag` is also the environment variable MONE_<FLAG>; flags win.  Values are exported to the
environment so that uvicorn worker processes build the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from mone.server.config import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mone-serve",
        description="Serve a MoNE checkpoint with per-request compute budgets. "
        "Every option can also be set as the environment variable MONE_<OPTION>.",
    )
    for name, field in Settings.model_fields.items():
        help_text = field.description or ""
        default = field.get_default(call_default_factory=True)
        help_text += (
            f" (default: {default.get_secret_value() if hasattr(default, 'get_secret_value') else default})"
        )
        if field.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif _is_list(field.annotation):
            parser.add_argument(_flag(name), dest=name, metavar="A,B,...", help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, help=help_text)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Parse flags, export them as MONE_* variables and build (validate) the settings."""
    args = build_parser().parse_args(argv)
    for name, value in vars(args).items():
        if value is None:
            continue
        field = Settings.model_fields[name]
        if field.annotation is bool:
            text = "true" if value else "false"
        elif _is_list(field.annotation):
            text = json.dumps([float(v) if "." in v else int(v) for v in str(value).split(",") if v])
        else:
            text = str(value)
        os.environ["MONE_" + name.upper()] = text
    return Settings()


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: HTTP handling and decoding share the cores with torch's
    # intra-op threads (with the small model, 64 clients on 2 cores: 224 instead of 162 req/s).  Must be set
    # before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        # Without the input values: they may hold the api_key.
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        print("mone-serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.random_init and not settings.checkpoint.exists():
        print(
            f"mone-serve: checkpoint {settings.checkpoint} does not exist.\n"
            "  Point MONE_CHECKPOINT (or --checkpoint) at a checkpoint directory (model.safetensors +\n"
            "  config.json), or start with --random-init to serve a randomly initialised model.",
            file=sys.stderr,
        )
        return 2
    if not settings.workers:  # auto: decided here, before any worker starts, and exported to them
        from mone.server.workers import resolve_processes

        layout = resolve_processes(settings)
        os.environ["MONE_WORKERS"] = str(layout.workers)
        if layout.threads is not None:
            os.environ["MONE_THREADS"] = str(layout.threads)
        settings = Settings()
        logging.getLogger("mone.server").info(
            "%d worker process(es), %s intra-op thread(s) each: %s",
            layout.workers,
            layout.threads or "torch's default",
            layout.reason,
        )
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported anywhere: every worker writes its samples here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mone-metrics-")
    import uvicorn

    # uvicorn re-raises a captured SIGTERM once it has drained; without a handler of our own that would
    # end the process with 143 after a clean shutdown.  (Before uvicorn takes over, it simply exits.)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from mone.server.http.protocol import DeadlineHttpToolsProtocol

    options: dict[str, Any] = {
        "factory": True,
        "http": DeadlineHttpToolsProtocol,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "access_log": not settings.access_log,  # ours has the request id and what was served
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive,
        "timeout_graceful_shutdown": settings.timeout_graceful_shutdown,
    }
    app = "mone.server.http.app:app_factory"
    if settings.workers == 1:
        uvicorn.run(app, **options)  # exits with uvicorn's start-up failure code itself
        return 0
    return _supervise(uvicorn.Config(app, **options))


def _supervise(config: Any) -> int:
    """Several workers under a supervisor (`_Supervisor`), which restarts a worker that dies while serving
    and stops when one fails to start (a bad checkpoint fails every worker alike): then this exits with
    uvicorn's start-up failure code, as one worker does."""
    from uvicorn.config import STARTUP_FAILURE

    try:
        supervisor = _supervisor_class()(config)
    except OSError as exc:  # the port is taken, or the address is not ours
        logging.getLogger("uvicorn.error").error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return STARTUP_FAILURE
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else 0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening (its worker listens once it is
    ready)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _supervisor_class() -> Any:
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess, Process, logger

    class _Supervisor(Multiprocess):
        """uvicorn's supervisor, with a listening socket per worker, all bound to the port with SO_REUSEPORT:
        the kernel spreads new connections evenly over the workers.  On one shared socket (uvicorn's way)
        whichever worker wakes first accepts every connection waiting, and 16 keep-alive clients that connect
        at once could all land on one worker while the other idles (seen: 315 against 443-554 req/s).

        A worker that dies gets a fresh socket and its old one is closed: connections still queued on it are
        reset (an error the client sees at once) instead of waiting for the replacement to load the model,
        and new ones go to the other workers until the replacement listens.  A rolling restart (SIGHUP) hands
        each worker's socket to its replacement, so nothing queued is dropped."""

        def __init__(self, config: Any) -> None:
            # Without SO_REUSEPORT first: a port that another server (of any kind) listens on is refused,
            # as one worker's bind would refuse it, instead of being shared with it.
            with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((config.host, config.port))
                config.port = probe.getsockname()[1]
            first = reuse_port_socket(config.host, config.port)
            self.port = first.getsockname()[1]  # the port picked when config.port is 0
            self.own = [first] + [
                reuse_port_socket(config.host, self.port) for _ in range(config.workers - 1)
            ]
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
                    logger.error(
                        f"Child process [{process.pid}] failed to start, stopping the parent process."
                    )
                    self.should_exit.set()
                    return
                if self.should_exit.is_set():
                    return
                logger.info(f"Child process [{process.pid}] died")
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
                            f"New child process [{new.pid}] was not ready in time; keeping [{old.pid}]."
                        )
                    return
                old.terminate()
                old.join()
                self.processes[idx] = new

    return _Supervisor


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
