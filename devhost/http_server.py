"""The HTTP front end: HTTP-triggered functions under /{routePrefix}/{route} plus the admin API
launchers use (`GET /admin/host/status`, `POST /admin/functions/{name}`)."""
from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
from azure.functions import _abc as azf_abc

from devhost.functions import HTTP_TRIGGER, FunctionSpec
from devhost.invocation import Invoker
from devhost.routing import Route, Router

log = logging.getLogger("devhost.http")

ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
PROTECTED_AUTH_LEVELS = ("function", "admin")
# Hop-by-hop or length headers are the server's business, not the function's.
_SKIPPED_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}
MAX_BODY_BYTES = 100 * 1024 * 1024  # the host's default request size limit

# App Service Authentication sets these for the caller it validated and strips them from clients
# ("External requests aren't allowed to set these headers", learn.microsoft.com/azure/app-service/
# configure-authentication-user-identities); devhost does the same unless it emulates Easy Auth, when
# the test plays the platform and supplies them.
CLIENT_PRINCIPAL_PREFIX = "x-ms-client-principal"

# (status, headers as a list so repeated headers such as Set-Cookie survive, body)
Reply = tuple[int, list[tuple[str, str]], bytes]
# Starts a non-HTTP function by name with the given input text; returns False if unknown.
AdminInvoke = Callable[[str, str], bool]


def function_route(spec: FunctionSpec, route_prefix: str) -> str:
    route = str(spec.trigger.get("route") or spec.name).strip("/")
    return "/".join(part for part in (route_prefix, route) if part)


def build_router(specs: list[FunctionSpec], route_prefix: str) -> Router[FunctionSpec]:
    router: Router[FunctionSpec] = Router()
    for spec in specs:
        if spec.trigger.type != HTTP_TRIGGER:
            continue
        methods = spec.trigger.get("methods")
        allowed = frozenset(str(m).upper() for m in methods) if methods else None
        router.add(Route(function_route(spec, route_prefix), allowed, spec))
    return router


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


class HttpFrontend:
    def __init__(self, bind: str, port: int, route_prefix: str, specs: list[FunctionSpec], invoker: Invoker,
                 *, function_key: str | None, admin_invoke: AdminInvoke, emulate_easy_auth: bool = False) -> None:
        self.router = build_router(specs, route_prefix)
        self._invoker = invoker
        self._function_key = function_key
        self._emulate_easy_auth = emulate_easy_auth
        self._admin_invoke = admin_invoke
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((bind, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="devhost-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting requests; requests already being handled still complete."""
        # shutdown() waits for serve_forever to exit, so it would block forever if never started.
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    # -- request handling ------------------------------------------------------------------
    def _authorised(self, request: "_Handler", params: dict[str, str]) -> bool:
        if not self._function_key:
            return True  # like Core Tools: keys are not enforced locally unless asked for
        given = request.headers.get("x-functions-key") or params.get("code") or ""
        return hmac.compare_digest(given.encode(), self._function_key.encode())

    def _respond_function(self, request: "_Handler", spec: FunctionSpec, route_params: dict[str, str],
                          params: dict[str, str], body: bytes) -> Reply:
        auth_level = str(spec.trigger.get("authLevel") or "function").lower()
        if auth_level in PROTECTED_AUTH_LEVELS and not self._authorised(request, params):
            return 401, [], error_body("Unauthorized", "a valid function key is required (?code= or x-functions-key)")
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            if name.lower().startswith(CLIENT_PRINCIPAL_PREFIX) and not self._emulate_easy_auth:
                continue
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        host = request.headers.get("Host") or f"127.0.0.1:{self.port}"
        http_request = func.HttpRequest(request.command, f"http://{host}{request.path}", headers=headers,
                                        params=params, route_params=route_params, body=body)
        try:
            value = self._invoker.invoke(
                spec, http_request, reason="This function was programmatically called via the host APIs.")
            return self._to_http(value)
        except Exception as exc:
            return 500, [], error_body(
                "InternalError", f"Exception while executing function: Functions.{spec.name}: "
                                 f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _to_http(value: Any) -> Reply:
        if isinstance(value, azf_abc.HttpResponse):
            headers = [(k, v) for k, v in value.headers.items() if k.lower() not in _SKIPPED_RESPONSE_HEADERS]
            if not any(k.lower() == "content-type" for k, _ in headers):
                # The worker's rule: text types carry the charset, others the bare MIME type.
                mimetype = value.mimetype
                headers.append(("Content-Type", f"{mimetype}; charset={value.charset}"
                                if mimetype.startswith("text/") else mimetype))
            return int(value.status_code), headers, value.get_body()
        if value is None:
            return 204, [], b""
        if isinstance(value, str):
            return 200, [("Content-Type", "text/plain; charset=utf-8")], value.encode("utf-8")
        if isinstance(value, (bytes, bytearray)):
            return 200, [("Content-Type", "application/octet-stream")], bytes(value)
        raise TypeError(f"an HTTP function must return func.HttpResponse or str, not {type(value).__name__}")

    def _dispatch(self, request: "_Handler") -> Reply:
        url = urlsplit(request.path)
        method = request.command.upper()
        query = parse_qs(url.query, keep_blank_values=True)
        # Repeated keys are joined with commas, as ASP.NET's query collection renders them.
        params = {key: ",".join(values) for key, values in query.items()}
        if url.path.rstrip("/") == "/admin/host/status" and method in ("GET", "HEAD"):
            return 200, [("Content-Type", "application/json")], json.dumps({"state": "Running"}).encode()
        if url.path.startswith("/admin/functions/") and method == "POST":
            return self._admin(request, url.path.rsplit("/", 1)[-1], params)
        match, allowed = self.router.resolve(url.path, method)
        if match is None:
            if allowed:
                return 405, [("Allow", ", ".join(sorted(allowed)))], error_body(
                    "MethodNotAllowed", f"{method} is not allowed here; use {', '.join(sorted(allowed))}")
            request.read_body()  # keep the connection usable
            return 404, [], error_body("NotFound", f"no function is mapped to {url.path}")
        return self._respond_function(request, match.target, match.params, params, request.read_body())

    def _admin(self, request: "_Handler", name: str, params: dict[str, str]) -> Reply:
        body = request.read_body()
        if not self._authorised(request, params):
            return 401, [], error_body("Unauthorized", "the admin API needs the function key")
        try:
            payload = json.loads(body or b"{}")
            text = str(payload.get("input", "")) if isinstance(payload, dict) else ""
        except ValueError:
            return 400, [], error_body("BadRequest", 'expected a JSON body like {"input": "..."}')
        if not self._admin_invoke(name, text):
            return 404, [], error_body("NotFound", f"no non-HTTP function named {name!r}")
        return 202, [], b""

    def _handler_class(self) -> type["_Handler"]:
        frontend = self

        class Handler(_Handler):
            def handle_any(self) -> None:
                # One handler serves every request of a keep-alive connection: forget the last body.
                self._body = None
                with frontend._invoker.activity.track():
                    try:
                        status, headers, body = frontend._dispatch(self)
                    except _BadRequest as exc:
                        status, headers, body = 400, [], error_body("BadRequest", str(exc))
                        self.close_connection = True
                    self.send(status, headers, body)

        return Handler


class _BadRequest(ValueError):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real host
    server_version = "devhost"
    _body: bytes | None = None

    def handle_any(self) -> None:  # replaced per server
        raise NotImplementedError

    def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise _BadRequest("bad Content-Length") from None
            if length > MAX_BODY_BYTES:
                raise _BadRequest("request body too large")
            self._body = self.rfile.read(length) if length > 0 else b""
        return self._body

    def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        self.send_response(status, reason)
        if body and not any(k.lower() == "content-type" for k, _ in headers):
            headers = [*headers, ("Content-Type", "application/json; charset=utf-8")]
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


for _method in ALL_METHODS:
    setattr(_Handler, f"do_{_method}", lambda self: self.handle_any())
