"""A recording reverse proxy in front of an Azurite service (queue or table): counts every
storage transaction (REST request) the app makes, by operation and queue or table, for the benchmark.
It can also hold back answers (`delay_seconds`), to make storage slow for one host in a test."""
from __future__ import annotations

import collections
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def operation(method: str, path: str, query: str) -> tuple[str, str]:
    """(operation, queue) for a Queue service REST call."""
    parts = [p for p in path.split("/") if p]
    queue = parts[1] if len(parts) > 1 else ""
    comp = parse_qs(query).get("comp", [""])[0]
    peek = parse_qs(query).get("peekonly", [""])[0] == "true"
    if len(parts) >= 3 and parts[2] == "messages":
        if len(parts) >= 4:
            return {"DELETE": "delete", "PUT": "update"}.get(method, method), queue
        if method == "GET":
            return ("peek" if peek else "receive"), queue
        return {"POST": "send", "DELETE": "clear"}.get(method, method), queue
    if comp == "metadata":
        return ("get-properties" if method in ("GET", "HEAD") else "set-metadata"), queue
    if comp == "list":
        return "list-queues", ""
    return {"PUT": "create-queue", "DELETE": "delete-queue"}.get(method, method.lower()), queue


def table_operation(method: str, path: str, query: str) -> tuple[str, str]:
    """(operation, table) for a Table service REST call; a batch is one request whatever it holds."""
    parts = [p for p in path.split("/") if p]
    name = parts[1] if len(parts) > 1 else ""
    if name == "$batch":
        return "batch", ""
    if name.startswith("Tables"):
        return {"POST": "create-table", "DELETE": "delete-table"}.get(method, "list-tables"), ""
    table, _, key = name.partition("(")
    if method == "GET":
        return ("get-entity" if "PartitionKey=" in key else "query"), table
    return {"PUT": "upsert", "MERGE": "merge", "PATCH": "merge", "DELETE": "delete", "POST": "insert"}.get(
        method, method.lower()), table


class StorageProxy:
    def __init__(self, target_host: str, target_port: int, classify=operation):
        self.target = (target_host, target_port)
        self.classify = classify
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.delay_seconds = 0.0  # how long each answer is held back before it is passed on
        self._released = threading.Event()  # set() lets every held answer go at once
        self._drops: list = []  # predicates of requests whose answer is lost once (see lose_answer)
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                split = urlsplit(self.path)
                proxy.record(self.command, split.path, split.query)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                status, reason, response_headers, data = proxy.send(self.command, self.path, body, headers)
                if proxy.answer_lost(self.command, split.path):
                    self.close_connection = True  # done at the service, but the caller never hears
                    return
                if proxy.delay_seconds > 0:
                    proxy._released.wait(proxy.delay_seconds)
                self.send_response(status, reason)
                for key, value in response_headers:
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_MERGE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "StorageProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, method: str, path: str, query: str) -> None:
        with self._lock:
            self.counts[self.classify(method, path, query)] += 1

    def send(self, method, path, body, headers):
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self.target, timeout=60)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def slow_down(self, seconds: float) -> None:
        """Hold back every answer for `seconds` (the operation is done; only its answer waits)."""
        self._released.clear()
        self.delay_seconds = seconds

    def lose_answer(self, method: str, path_suffix: str, nth: int = 1) -> None:
        """Lose the answer to the nth next `method` request whose path ends with `path_suffix`."""
        seen = iter(range(1, nth + 1))

        def matches(m: str, path: str) -> bool:
            return m == method and path.endswith(path_suffix) and next(seen, None) == nth

        with self._lock:
            self._drops.append(matches)

    def answer_lost(self, method: str, path: str) -> bool:
        with self._lock:
            for drop in self._drops:
                if drop(method, path):
                    self._drops.remove(drop)
                    return True
        return False

    def speed_up(self) -> None:
        self.delay_seconds = 0.0
        self._released.set()

    def snapshot(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(self.counts)
