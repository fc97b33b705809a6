"""Shared plumbing for the loopback simulators: a threaded HTTP/1.1 server that can be started and
stopped in-process, and a request handler that timestamps arrivals, reads bodies and can drop the
connection without answering. Standard library only.
"""
from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping


class SimHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real services
    server_version = "Simulator/1.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this many seconds

    arrival: float = 0.0  # time.monotonic() when the request line arrived
    arrival_wall: float = 0.0  # time.time() at the same moment
    raw_target: str = ""  # request target exactly as received (before http.server normalises it)

    # --- arrival -----------------------------------------------------------------------------
    def parse_request(self) -> bool:  # called as soon as the request line has been read
        self.arrival = time.monotonic()
        self.arrival_wall = time.time()
        try:
            words = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n").split()
            self.raw_target = words[1] if len(words) >= 2 else ""
        except Exception:  # noqa: BLE001
            self.raw_target = ""
        return super().parse_request()

    # --- body --------------------------------------------------------------------------------
    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # --- answers -----------------------------------------------------------------------------
    def send_bytes(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        self.send_response(status)
        sent = {k.lower() for k in (headers or {})}
        if content_type and "content-type" not in sent:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            if name.lower() == "content-length":
                continue
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, status: int, payload: Any, *, headers: Mapping[str, Any] | None = None,
                  content_type: str = "application/json") -> None:
        self.send_bytes(status, json.dumps(payload).encode("utf-8"), content_type=content_type, headers=headers)

    def reset_connection(self) -> None:
        """Drop the connection without answering (the client sees a reset / disconnect)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.connection.close()  # with linger 0 this sends RST
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"[{self.server.__class__.__name__}] {self.address_string()} {format % args}\n")


class SimServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that runs in a background thread: `start()`, `stop()`, `base_url`."""

    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block stop()
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, handler: type[SimHandler], port: int = 0, host: str = "127.0.0.1",
                 *, verbose: bool = False) -> None:
        super().__init__((host, port), handler)
        self.verbose = verbose
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.server_address[0]

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "SimServer":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"{self.__class__.__name__}:{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()

    def __enter__(self) -> "SimServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def parse_json_body(raw: bytes) -> Any:
    """Parse a JSON admin body ({} when empty); raises ValueError when it is not JSON."""
    if not raw.strip():
        return {}
    return json.loads(raw.decode("utf-8"))


def serve_until_signalled(running: Any, ready_line: str) -> int:
    """The command-line loop of every simulator: print the settings that point the app at it, then
    `ready_line` (launchers wait for it), and run until SIGINT or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for name, value in running.env().items():
            print(f"{name}={value}")
        print(ready_line, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        running.stop()
    return 0
