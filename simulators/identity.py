"""Managed identity endpoint simulator (the App Service / Azure Functions protocol).

`GET /msi/token?api-version=2019-08-01&resource=<audience>[&client_id=...]` with header
`X-IDENTITY-HEADER: <secret>` answers
`{"access_token", "expires_on" (epoch seconds as a string), "resource", "token_type", "client_id"}`,
which is what azure-identity's ManagedIdentityCredential (through MSAL) expects when
IDENTITY_ENDPOINT and IDENTITY_HEADER are set.

Faults and settings for tests, as Python methods and as `/_sim/...` JSON endpoints:
  GET  /_sim/stats      counters and current fault
  GET  /_sim/requests   log of token requests (the header value is never recorded)
  POST /_sim/fault      {"mode": 500|503|"down"|null, "count": n?, "seconds": s?}
  POST /_sim/roles      {"roles": [...]}
  POST /_sim/config     {"roles", "token_lifetime", "tenant_id", "client_id", "object_id", "delay"}
  POST /_sim/token      mint a token directly: {"roles", "aud", "lifetime", "exp", "tid", ...}
  POST /_sim/reset      clear counters, log and fault
"""
from __future__ import annotations

import copy
import secrets
import threading
import time
import uuid
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from .httpbase import SimHandler, SimServer, parse_json_body
from .tokens import (
    DEFAULT_LIFETIME,
    DEFAULT_ROLES,
    SIM_CLIENT_ID,
    SIM_OBJECT_ID,
    SIM_TENANT_ID,
    TokenSigner,
    default_signer,
    resource_to_audience,
)

TOKEN_PATH = "/msi/token"
API_VERSION = "2019-08-01"
FAULT_MODES = ("500", "503", "down")


class IdentitySimulator(SimServer):
    """The managed identity endpoint. `endpoint` is the value for IDENTITY_ENDPOINT."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        identity_header: str | None = None,
        signer: TokenSigner | None = None,
        roles: Iterable[str] | None = None,
        tenant_id: str = SIM_TENANT_ID,
        client_id: str = SIM_CLIENT_ID,
        object_id: str = SIM_OBJECT_ID,
        token_lifetime: float = DEFAULT_LIFETIME,
        verbose: bool = False,
    ) -> None:
        super().__init__(_IdentityHandler, port, host, verbose=verbose)
        self.identity_header = identity_header or secrets.token_hex(24)
        self.signer = signer or default_signer()
        self._lock = threading.Lock()
        self.roles: list[str] = list(DEFAULT_ROLES if roles is None else roles)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.object_id = object_id
        self.token_lifetime = float(token_lifetime)
        self.delay = 0.0  # seconds before answering a token request
        self._fault: dict[str, Any] | None = None
        self.token_requests = 0  # every GET /msi/token arrival
        self.tokens_issued = 0
        self.rejected = 0  # 4xx answers (bad header, bad parameters)
        self.faulted = 0  # answered by the fault (500/503/down)
        self._log: list[dict[str, Any]] = []

    # --- properties ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"{self.base_url}{TOKEN_PATH}"

    # --- controls ------------------------------------------------------------------------------
    def fail(self, mode: str | int | None, *, count: int | None = None, seconds: float | None = None) -> None:
        """Answer token requests with 500 or 503, or drop the connection ("down").

        Lasts for the next `count` token requests and/or `seconds` seconds (whichever ends first);
        with neither, until `recover()`. `mode=None` recovers.
        """
        if mode is None:
            self.recover()
            return
        mode = str(mode)
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {FAULT_MODES} or None, not {mode!r}")
        with self._lock:
            self._fault = {
                "mode": mode,
                "remaining": None if count is None else int(count),
                "until": None if seconds is None else time.monotonic() + float(seconds),
            }

    def recover(self) -> None:
        with self._lock:
            self._fault = None

    @property
    def fault(self) -> dict[str, Any] | None:
        with self._lock:
            self._expire_fault_locked(time.monotonic())
            if self._fault is None:
                return None
            f = dict(self._fault)
            if f["until"] is not None:
                f["seconds_left"] = max(0.0, f["until"] - time.monotonic())
            del f["until"]
            return f

    def set_roles(self, roles: Iterable[str]) -> None:
        with self._lock:
            self.roles = list(roles)

    def configure(self, **settings: Any) -> None:
        """Change roles, token_lifetime, tenant_id, client_id, object_id or delay."""
        allowed = {"roles", "token_lifetime", "tenant_id", "client_id", "object_id", "delay"}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown identity settings: {sorted(unknown)}")
        with self._lock:
            for name, value in settings.items():
                if name == "roles":
                    value = list(value)
                elif name in ("token_lifetime", "delay"):
                    value = float(value)
                setattr(self, name, value)

    def reset(self) -> None:
        with self._lock:
            self.token_requests = self.tokens_issued = self.rejected = self.faulted = 0
            self._log.clear()
            self._fault = None

    def stats(self) -> dict[str, Any]:
        fault = self.fault
        with self._lock:
            return {
                "token_requests": self.token_requests,
                "tokens_issued": self.tokens_issued,
                "rejected": self.rejected,
                "faulted": self.faulted,
                "fault": fault,
                "roles": list(self.roles),
            }

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._log)

    def mint_token(self, resource: str = "https://graph.microsoft.com", **overrides: Any) -> str:
        """A token as this endpoint would issue it; claims can be overridden (roles, exp, aud...)."""
        with self._lock:
            base = {
                "aud": resource_to_audience(resource),
                "tid": self.tenant_id,
                "oid": self.object_id,
                "appid": self.client_id,
                "roles": list(self.roles),
                "lifetime": self.token_lifetime,
            }
        base.update(overrides)
        return self.signer.mint(**base)

    # --- internals -----------------------------------------------------------------------------
    def _expire_fault_locked(self, now: float) -> None:
        f = self._fault
        if f is not None and f["until"] is not None and now >= f["until"]:
            self._fault = None

    def _take_fault(self) -> str | None:
        """The fault mode that applies to this token request (consumes one of `count`)."""
        with self._lock:
            self._expire_fault_locked(time.monotonic())
            f = self._fault
            if f is None:
                return None
            if f["remaining"] is not None:
                if f["remaining"] <= 0:
                    self._fault = None
                    return None
                f["remaining"] -= 1
                if f["remaining"] <= 0:
                    self._fault = None
            self.faulted += 1
            return f["mode"]


class _IdentityHandler(SimHandler):
    server: IdentitySimulator

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == TOKEN_PATH:
            self._token(parts.query)
        elif parts.path == "/_sim/stats":
            self.send_json(200, self.server.stats())
        elif parts.path == "/_sim/requests":
            self.send_json(200, self.server.requests())
        else:
            self.send_json(404, {"statusCode": 404, "message": f"No route for {parts.path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = parse_json_body(self.read_body())
            if not isinstance(body, dict):
                raise ValueError("JSON object expected")
        except ValueError as exc:
            self.send_json(400, {"error": f"bad admin body: {exc}"})
            return
        sim = self.server
        try:
            if path == "/_sim/fault":
                sim.fail(body.get("mode"), count=body.get("count"), seconds=body.get("seconds"))
                self.send_json(200, sim.stats())
            elif path == "/_sim/roles":
                sim.set_roles(body.get("roles") or [])
                self.send_json(200, sim.stats())
            elif path == "/_sim/config":
                sim.configure(**body)
                self.send_json(200, sim.stats())
            elif path == "/_sim/token":
                resource = body.pop("resource", "https://graph.microsoft.com")
                self.send_json(200, {"access_token": sim.mint_token(resource, **body)})
            elif path == "/_sim/reset":
                sim.reset()
                self.send_json(200, sim.stats())
            elif path == TOKEN_PATH:
                self.send_json(405, {"statusCode": 405, "message": "The token endpoint only answers GET."})
            else:
                self.send_json(404, {"error": f"No route for {path}"})
        except (TypeError, ValueError) as exc:
            self.send_json(400, {"error": str(exc)})

    def _token(self, query: str) -> None:
        sim = self.server
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        given = self.headers.get("X-IDENTITY-HEADER")
        entry: dict[str, Any] = {
            "arrival": self.arrival,
            "wall_time": self.arrival_wall,
            "query": params,
            "identity_header": "missing" if given is None else ("valid" if given == sim.identity_header else "invalid"),
            "status": None,
        }
        with sim._lock:
            sim.token_requests += 1
            sim._log.append(entry)

        def answer(status: int, payload: Any) -> None:
            with sim._lock:
                entry["status"] = status
                if 400 <= status < 500:
                    sim.rejected += 1
            self.send_json(status, payload)

        mode = sim._take_fault()
        if mode == "down":
            with sim._lock:
                entry["status"] = "reset"
            self.reset_connection()
            return
        if mode in ("500", "503"):
            status = int(mode)
            message = "Internal server error." if status == 500 else "Service unavailable, try again later."
            answer(status, {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())})
            return
        if sim.delay > 0:
            time.sleep(sim.delay)
        if given is None or not secrets.compare_digest(given.encode(), sim.identity_header.encode()):
            answer(401, {
                "statusCode": 401,
                "message": "Unauthorized: the X-IDENTITY-HEADER header is missing or invalid.",
                "error": "unauthorized_client",
                "error_description": "X-IDENTITY-HEADER is missing or invalid.",
                "correlationId": str(uuid.uuid4()),
            })
            return
        if params.get("api-version") != API_VERSION:
            answer(400, {"statusCode": 400, "message": f"api-version must be {API_VERSION}.",
                         "correlationId": str(uuid.uuid4())})
            return
        resource = params.get("resource", "")
        if not resource.strip():
            answer(400, {"statusCode": 400, "message": "The 'resource' parameter is required.",
                         "correlationId": str(uuid.uuid4())})
            return
        client_id = params.get("client_id") or sim.client_id
        with sim._lock:
            lifetime = sim.token_lifetime
            now = int(time.time())
            token = sim.signer.mint(
                aud=resource_to_audience(resource),
                tid=sim.tenant_id,
                oid=sim.object_id,
                appid=client_id,
                roles=list(sim.roles),
                lifetime=lifetime,
                iat=now,
            )
            sim.tokens_issued += 1
        answer(200, {
            "access_token": token,
            "expires_on": str(int(now + lifetime)),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        })
