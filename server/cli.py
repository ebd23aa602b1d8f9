"""`mone-serve` / `python -m mone.server`: the command line mirrors `Settings` field by field.

Every `--flag` is also the environment variable MONE_<FLAG>; flags win.  Values are exported to the
environment so that uvicorn worker processes build the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    from mone.server.supervisor import supervise

    return supervise(uvicorn.Config(app, **options))


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
