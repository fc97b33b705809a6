"""Directory reads for the Graph simulator: what intake's name lookups ask (shared/intake/names.py).

  GET /{version}/users?$filter=<prop> eq '<value>'              userPrincipalName, mail, employeeId, id
  GET /{version}/groups?$filter=<prop> eq '<value>'             mailNickname, displayName, id
  GET /{version}/servicePrincipals?$filter=<prop> eq '<value>'  displayName, appId, id
  GET /{version}/servicePrincipals/{id}/synchronization/jobs    the jobs configured here

As Graph does: the bearer token is verified and its roles checked (User.Read.All, Group.Read.All,
Application.Read.All, or Directory.Read.All for all three) -> 401 / 403; string comparison is
case-insensitive; a quote inside a literal is written twice; filtering on employeeId is an
advanced query and needs `ConsistencyLevel: eventual` and `$count=true`, else 400
Request_UnsupportedQuery (https://learn.microsoft.com/graph/aad-advanced-queries). `$top` caps
the answer. None of this is rate limited or counted: the limit simulated is provisionOnDemand's.

Admin (JSON): GET/POST/DELETE /_sim/directory ({"users": [...], "groups": [...],
"servicePrincipals": [...], "httpStatus": 503 to fail every read}), GET /_sim/directory/calls.
In process: `directory_of(sim).add(users=[...])`.
"""
from __future__ import annotations

import re
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import parse_qs, unquote

from .responses import graph_error
from .tokens import TokenError

if TYPE_CHECKING:
    from .graph import GraphSimulator, _GraphHandler

VERSIONS = ("v1.0", "beta")
READ_ALL = "Directory.Read.All"
COLLECTIONS: dict[str, tuple[str, frozenset[str]]] = {  # path -> (permission, filterable properties)
    "users": ("User.Read.All", frozenset({"id", "userPrincipalName", "mail", "employeeId"})),
    "groups": ("Group.Read.All", frozenset({"id", "mailNickname", "displayName"})),
    "servicePrincipals": ("Application.Read.All", frozenset({"id", "appId", "displayName"})),
}
ADVANCED = frozenset({"employeeId"})
JOB_ROLES = frozenset({"Synchronization.Read.All", "Synchronization.ReadWrite.All", "Application.ReadWrite.OwnedBy"})
FILTER_RE = re.compile(r"^\s*(\w+)\s+eq\s+'((?:[^']|'')*)'\s*$")


class Directory:
    """Users, groups and service principals (each a dict with at least `id`), and a call log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.objects: dict[str, list[dict[str, Any]]] = {name: [] for name in COLLECTIONS}
        self.http_status: int | None = None
        self.calls: list[dict[str, Any]] = []

    def add(self, **collections: list[Mapping[str, Any]]) -> dict[str, Any]:
        with self._lock:
            for name, objects in collections.items():
                self.objects[name].extend({"id": str(uuid.uuid4()), **o} for o in objects)
        return self.state()

    def clear(self) -> dict[str, Any]:
        with self._lock:
            self.objects = {name: [] for name in COLLECTIONS}
            self.http_status = None
            self.calls.clear()
        return self.state()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {**{k: list(v) for k, v in self.objects.items()}, "httpStatus": self.http_status}

    def matching(self, collection: str, prop: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [o for o in self.objects[collection] if str(o.get(prop, "")).lower() == value.lower()]

    def jobs(self, service_principal_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            sp = next((o for o in self.objects["servicePrincipals"] if o["id"] == service_principal_id), None)
        return None if sp is None else [{"id": j, "templateId": j.split(".")[0]} for j in sp.get("jobs", [])]


def directory_of(sim: "GraphSimulator") -> Directory:
    with sim._lock:
        if not hasattr(sim, "_directory"):
            sim._directory = Directory()  # type: ignore[attr-defined]
        return sim._directory  # type: ignore[attr-defined]


def _route(segments: list[str]) -> tuple[str, str | None] | None:
    """(collection, service principal id for its jobs) when the path is one of ours."""
    if len(segments) == 2 and segments[0] in VERSIONS and segments[1] in COLLECTIONS:
        return segments[1], None
    if (len(segments) == 5 and segments[0] in VERSIONS and segments[1] == "servicePrincipals"
            and segments[3:] == ["synchronization", "jobs"]):
        return "jobs", segments[2]
    return None


def handle(handler: "_GraphHandler", raw_path: str) -> bool:
    """Answer a directory read; False when the request is not one (Graph's own routes take it)."""
    route = _route([unquote(s) for s in raw_path.strip("/").split("/")])
    if route is None or handler.command != "GET":
        return False
    sim = handler.server
    directory = directory_of(sim)
    query = {k: v[-1] for k, v in parse_qs(handler.raw_target.partition("?")[2]).items()}
    request_id = str(uuid.uuid4())
    record = {"path": raw_path, "query": query, "consistencyLevel": handler.headers.get("ConsistencyLevel"),
              "status": None}

    def answer(status: int, body: dict[str, Any]) -> bool:
        record["status"] = status
        with directory._lock:
            directory.calls.append(record)
        handler.send_json(status, body, headers={"request-id": request_id})
        return True

    def error(status: int, code: str, message: str) -> bool:
        return answer(status, graph_error(code, message, request_id, request_id))

    try:
        claims = sim.signer.decode((handler.headers.get("Authorization") or "").partition(" ")[2].strip(),
                                   audiences=sim.audiences, leeway=sim.clock_skew)
    except TokenError as exc:
        return error(401, "InvalidAuthenticationToken", str(exc))
    if directory.http_status:
        return error(directory.http_status, "ServiceUnavailable", "Scripted directory failure.")
    roles = set(claims.get("roles") or [])
    collection, sp = route
    if sp is not None:
        return _jobs(directory, sp, roles, answer, error)
    if not roles & {COLLECTIONS[collection][0], READ_ALL}:
        return error(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
    return _list(directory, collection, query, record["consistencyLevel"], answer, error)


def _jobs(directory: Directory, sp: str, roles: set[str], answer: Callable[..., bool],
          error: Callable[..., bool]) -> bool:
    if not roles & JOB_ROLES:
        return error(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
    jobs = directory.jobs(sp)
    if jobs is None:
        return error(404, "Request_ResourceNotFound", f"Resource '{sp}' does not exist.")
    return answer(200, {"value": jobs})


def _list(directory: Directory, collection: str, query: dict[str, str], consistency: str | None,
          answer: Callable[..., bool], error: Callable[..., bool]) -> bool:
    match = FILTER_RE.match(query.get("$filter", ""))
    if match is None or match.group(1) not in COLLECTIONS[collection][1]:
        return error(400, "Request_UnsupportedQuery", f"Unsupported or invalid query filter clause: "
                                                      f"{query.get('$filter')!r}.")
    prop, value = match.group(1), match.group(2).replace("''", "'")
    if prop in ADVANCED and (consistency != "eventual" or query.get("$count") != "true"):
        return error(400, "Request_UnsupportedQuery", f"Unsupported or invalid query filter clause specified for "
                                                      f"property '{prop}' of resource '{collection}'.")
    found = directory.matching(collection, prop, value)
    selected = [p.strip() for p in query.get("$select", "").split(",") if p.strip()]
    shown = [{k: o.get(k) for k in selected} if selected else dict(o) for o in found[:int(query.get("$top", "100"))]]
    body: dict[str, Any] = {"value": shown}
    if query.get("$count") == "true":
        body["@odata.count"] = len(found)
    return answer(200, body)


def _configure(sim: "GraphSimulator", body: Any) -> dict[str, Any]:
    directory = directory_of(sim)
    directory.add(**{k: v for k, v in dict(body).items() if k in COLLECTIONS})
    if "httpStatus" in body:
        directory.http_status = body["httpStatus"]
    return directory.state()


# Merged into the Graph simulator's admin route table.
ADMIN_ROUTES: dict[tuple[str, str], Callable[["GraphSimulator", Any, dict[str, str]], Any]] = {
    ("/_sim/directory", "GET"): lambda sim, body, query: directory_of(sim).state(),
    ("/_sim/directory", "POST"): lambda sim, body, query: _configure(sim, body),
    ("/_sim/directory", "DELETE"): lambda sim, body, query: directory_of(sim).clear(),
    ("/_sim/directory/calls", "GET"): lambda sim, body, query: list(directory_of(sim).calls),
}


def register(admin_routes: dict[tuple[str, str], Any]) -> None:
    admin_routes.update(ADMIN_ROUTES)
