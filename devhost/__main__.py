"""`python -m devhost [--port 7071] [--app-dir DIR] [--settings FILE]`: a local `func start`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from devhost.host import Host, HostOptions

log = logging.getLogger("devhost")


class _UtcFormatter(logging.Formatter):
    """Core Tools' `[2024-01-01T12:00:00.000Z] message` line format."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_UtcFormatter("[%(asctime)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The SDKs log every HTTP request at INFO; that would drown the function logs.
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devhost", description=__doc__)
    parser.add_argument("--port", type=int, default=None,
                        help="HTTP port (default: local.settings Host.LocalHttpPort, else 7071)")
    parser.add_argument("--app-dir", type=Path, default=Path.cwd(), help="folder with function_app.py (default: cwd)")
    parser.add_argument("--settings", type=Path, default=None,
                        help="settings file (default: local.settings.json, else local.settings.sample.json)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to let running invocations finish on SIGINT/SIGTERM (default 30)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Line buffering so launchers reading our stdout see "Host started" when it happens.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    configure_logging(args.verbose)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("Second %s: exiting without waiting", signal.Signals(signum).name)
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    host = Host(HostOptions(app_dir=args.app_dir, port=args.port, settings_file=args.settings,
                            shutdown_timeout=args.shutdown_timeout))
    try:
        host.start()
    except Exception as exc:
        log.error("Host failed to start: %s", exc, exc_info=args.verbose)
        host.stop(timeout=5)
        return 1
    # Short waits keep the main thread responsive to signals.
    while not stop.wait(0.5):
        pass
    drained = host.stop()
    if not drained:
        # Abandoned worker threads would block interpreter exit; the drain wait already passed.
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
