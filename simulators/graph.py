"""Microsoft Graph simulator for `POST /{v1.0|beta}/servicePrincipals/{id}/synchronization/jobs/{jobId}/provisionOnDemand`.

Order of handling for each arrival (arrival time = when the request line arrived, monotonic):
  1. recorded in the call log (Authorization recorded only as "Bearer <redacted>");
  2. unknown path -> 404, known path with another method -> 405 (not counted for rate);
  3. fault script for the first subject's objectId (or "*"): the next canned answer is served
     (after its delay; `reset` drops the connection) and the arrival counts toward the rate window;
  4. bearer token verified (signature, exp, aud) -> 401 InvalidAuthenticationToken (not counted);
  5. sliding-window rate limit per tenant (tid) -> 429 TooManyRequests with Retry-After;
  6. roles (Synchronization.ReadWrite.All or Application.ReadWrite.OwnedBy) -> 403; OwnedBy alone
     from an identity that does not own the service principal (see `set_owners`) -> 401 UnknownError
     with an empty message, as Graph answers it;
  7. body validation -> 400 BadRequest / RequestParameterInvalid;
  8. optional latency, then 200 with a golden example (matched by objectId) or a generated Success
     (StatusInfo shape for jobs whose templateId is Azure2Azure, cross-tenant synchronization;
     Skipped / NotEffectivelyEntitled while the subject is out of scope, see `set_out_of_scope`).

Routes are the `ROUTES` table at the end: one `Route(method, template, handler)` line each. A handler
gets a `Call` (request parsed, recorded and its token verified once) and applies the shared auth
checks (`Call.deny_unauthenticated`, `deny_without_role`, `deny`) in the order its route needs.

Admin endpoints (JSON; not recorded, not rate limited):
  GET /_sim/calls, DELETE /_sim/calls (log and rate window), GET /_sim/stats,
  GET /_sim/max_in_window?window=10[&counted_only=1],
  GET/POST/DELETE /_sim/script, GET/POST /_sim/config,
  GET/POST/DELETE /_sim/jobs (per-job status for GET .../jobs/{jobId}; see `set_job`),
  GET/POST/DELETE /_sim/schemas (per-job GET .../jobs/{jobId}/schema; see `set_schema`),
  GET/POST/DELETE /_sim/out_of_scope (see `set_out_of_scope`), GET/POST/DELETE /_sim/owners (see `set_owners`).

`GET .../jobs/{jobId}/schema` answers synchronizationRules; `POST .../jobs/{jobId}/start` answers
204 and sets the job Active (recorded: see `start_calls`).

`GET /{version}/servicePrincipals/{id}/synchronization/jobs/{jobId}` answers a synchronizationJob
(status Active unless set otherwise). It is recorded but neither scripted nor rate limited: the
provisionOnDemand limit is the one being simulated.
"""
from __future__ import annotations

import copy
import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, unquote

from .httpbase import SimHandler, SimServer, parse_json_body
from .ratelimit import SlidingWindowLimiter, max_in_window, parse_rate
from .responses import (
    CROSS_TENANT_TEMPLATE,
    GOLDEN_DIR,
    generate_success,
    graph_error,
    load_golden,
    odata_context,
)
from .tokens import GRAPH_AUDIENCES, TokenError, TokenSigner, default_signer, unverified_claims

VERSIONS = ("v1.0", "beta")
REQUIRED_ROLES = frozenset({"Synchronization.ReadWrite.All", "Application.ReadWrite.OwnedBy"})
MAX_GROUP_MEMBERS = 5
SUCCESS_CONTENT_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
WWW_AUTHENTICATE = ('Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                    'client_id="00000003-0000-0000-c000-000000000000"')

JOB_READ_ROLES = REQUIRED_ROLES | {"Synchronization.Read.All"}
JOB_STATUS_CODES = ("NotConfigured", "NotRun", "Active", "Paused", "Quarantine")
# What an Entra ID -> SCIM app job's schema holds: one rule mapping users and groups.
DEFAULT_SCHEMA_RULES: list[dict[str, Any]] = [{
    "id": "03f7d90d-bf71-41b1-bda6-aaf0ddbee5d8", "name": "USER_GROUP_TO_SCIM",
    "sourceDirectoryName": "Azure Active Directory", "targetDirectoryName": "customappsso",
    "objectMappings": [
        {"enabled": True, "name": "Provision Azure Active Directory Users", "sourceObjectName": "User",
         "targetObjectName": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"},
        {"enabled": True, "name": "Provision Azure Active Directory Groups", "sourceObjectName": "Group",
         "targetObjectName": "urn:ietf:params:scim:schemas:core:2.0:Group"},
    ],
}]

_STATUS_CODES = {
    400: "BadRequest", 401: "InvalidAuthenticationToken", 403: "Authorization_RequestDenied",
    404: "Request_ResourceNotFound", 405: "Request_BadRequest", 409: "Conflict", 429: "TooManyRequests",
    500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout",
}

# OData property names per type in the request body (case-sensitive, as Graph checks them).
_PARAM_PROPS = {"ruleId", "subjects"}
_SUBJECT_PROPS = {"objectId", "objectTypeName", "links"}
_LINK_PROPS = {"members", "manager", "owners"}


class BodyError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_latency(value: Any) -> tuple[float, float]:
    """0.5 -> (0.5, 0.5); "0.2-2.5" -> (0.2, 2.5); [lo, hi] -> (lo, hi); None -> (0, 0)."""
    if value is None:
        return 0.0, 0.0
    if isinstance(value, (int, float)):
        lo = hi = value
    elif isinstance(value, str):
        lo, sep, hi = value.strip().partition("-")
        hi = hi if sep else lo
    else:
        lo, hi = value
    lo, hi = float(lo), float(hi)
    if lo < 0 or hi < lo:
        raise ValueError(f"latency range must satisfy 0 <= lo <= hi, not {value!r}")
    return lo, hi


def _check_props(obj: dict, allowed: set[str], type_name: str) -> None:
    for name in obj:
        if name not in allowed and not name.startswith("@odata."):
            raise BodyError(
                "BadRequest",
                f"The property '{name}' does not exist on type 'microsoft.graph.{type_name}'. "
                "Make sure to only use property names that are defined by the type.",
            )


def _check_subject(subject: Any, where: str) -> None:
    if not isinstance(subject, dict):
        raise BodyError("BadRequest", f"{where} must be a synchronizationJobSubject object.")
    _check_props(subject, _SUBJECT_PROPS, "synchronizationJobSubject")
    for prop in ("objectId", "objectTypeName"):
        value = subject.get(prop)
        if not isinstance(value, str) or not value.strip():
            raise BodyError("RequestParameterInvalid", f"The request parameter '{prop}' of {where} is invalid: "
                                                       "a non-empty string is required.")
    _check_links(subject, where)


def _check_links(subject: dict[str, Any], where: str) -> None:
    """links as OData reads synchronizationLinkedObjects: members and owners are collections of
    subjects, manager one subject, nothing else. What Graph does with ids it cannot resolve is not
    documented, so ids are checked only for being there."""
    links = subject.get("links")
    if links is None:
        return
    if not isinstance(links, dict):
        raise BodyError("BadRequest", f"{where}.links must be a synchronizationLinkedObjects object.")
    _check_props(links, _LINK_PROPS, "synchronizationLinkedObjects")
    for prop in ("members", "owners"):
        items = links.get(prop)
        if items is not None and not isinstance(items, list):
            raise BodyError("BadRequest", f"{where}.links.{prop} must be a collection.")
        for i, item in enumerate(items or []):
            _check_subject(item, f"{where}.links.{prop}[{i}]")
    if links.get("manager") is not None:
        _check_subject(links["manager"], f"{where}.links.manager")


def _check_parameter(param: Any, i: int) -> int:
    """Check one synchronizationJobApplicationParameters; returns how many groups it holds."""
    if not isinstance(param, dict):
        raise BodyError("BadRequest", f"parameters[{i}] must be a synchronizationJobApplicationParameters object.")
    _check_props(param, _PARAM_PROPS, "synchronizationJobApplicationParameters")
    rule_id = param.get("ruleId")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise BodyError("RequestParameterInvalid",
                        "The request parameter 'ruleId' is invalid: the synchronization rule id is required.")
    subjects = param.get("subjects")
    if not isinstance(subjects, list) or not subjects:
        raise BodyError("RequestParameterInvalid",
                        "The request parameter 'subjects' is invalid: at least one subject is required.")
    groups = 0
    for j, subject in enumerate(subjects):
        where = f"parameters[{i}].subjects[{j}]"
        _check_subject(subject, where)
        if subject["objectTypeName"].lower() == "group":
            groups += 1
            members = (subject.get("links") or {}).get("members") or []
            if len(members) > MAX_GROUP_MEMBERS:
                raise BodyError("BadRequest",
                                "The on-demand provisioning request API can only accept a single group with up "
                                f"to {MAX_GROUP_MEMBERS} members at a time; {where} has {len(members)} members.")
    return groups


def validate_provision_body(body: Any) -> None:
    """Raise BodyError like Graph would for a provisionOnDemand body."""
    if not isinstance(body, dict):
        raise BodyError("BadRequest", "Empty Payload. JSON content expected.")
    for name in body:
        if name != "parameters" and not name.startswith("@odata."):
            raise BodyError("BadRequest", f"The parameter '{name}' in the request payload is not a valid "
                                          "parameter for the operation 'provisionOnDemand'.")
    params = body.get("parameters")
    if not isinstance(params, list):
        raise BodyError("BadRequest", "The parameter 'parameters' is required and must be a collection of "
                                      "microsoft.graph.synchronizationJobApplicationParameters.")
    if not params:
        raise BodyError("RequestParameterInvalid", "The request parameter 'parameters' is invalid: it is empty.")
    groups = sum(_check_parameter(param, i) for i, param in enumerate(params))
    if groups > 1:
        raise BodyError("BadRequest", "The on-demand provisioning request API can only accept a single group "
                                      f"with up to {MAX_GROUP_MEMBERS} members at a time; {groups} groups were sent.")


def first_object_id(body: Any) -> str | None:
    try:
        oid = body["parameters"][0]["subjects"][0]["objectId"]
    except (KeyError, IndexError, TypeError):
        return None
    return oid if isinstance(oid, str) else None


class GraphSimulator(SimServer):
    """The Graph simulator. `endpoint` (no version suffix) is the value for GRAPH_ENDPOINT."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        signer: TokenSigner | None = None,
        latency: Any = None,
        rate_calls: int | None = 5,
        rate_window: float = 10.0,
        count_throttled: bool = True,
        audiences: Iterable[str] = GRAPH_AUDIENCES,
        clock_skew: float = 0.0,
        golden_dir: Path | str = GOLDEN_DIR,
        known_jobs: Iterable[tuple[str, str]] | None = None,
        seed: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(_GraphHandler, port, host, verbose=verbose)
        self.signer = signer or default_signer()
        self.audiences = frozenset(audiences)
        self.clock_skew = float(clock_skew)
        self.golden = load_golden(golden_dir)
        self.known_jobs = None if known_jobs is None else {tuple(j) for j in known_jobs}
        self.limiter = SlidingWindowLimiter(rate_calls, rate_window, count_throttled)
        self.latency = parse_latency(latency)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._log: list[dict[str, Any]] = []
        self._seq = itertools.count(1)
        self._script: dict[str, deque[dict[str, Any]]] = {}
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}
        self._out_of_scope: dict[str, int] = {}  # objectId -> calls still answered Skipped (NotEffectivelyEntitled)
        self._owners: dict[str, list[str]] = {}  # servicePrincipalId -> object ids of its owners (OwnedBy check)
        self.throttled = 0  # 429s answered by the rate limiter (scripted 429s not included)

    # --- properties ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.base_url

    @property
    def rate_calls(self) -> int | None:
        return self.limiter.calls

    @property
    def rate_window(self) -> float:
        return self.limiter.window

    @property
    def count_throttled(self) -> bool:
        return self.limiter.count_throttled

    # --- configuration -------------------------------------------------------------------------
    def configure(
        self,
        *,
        latency: Any = ...,
        rate_calls: int | None = None,
        rate_window: float | None = None,
        count_throttled: bool | None = None,
        rate: str | None = None,
        clock_skew: float | None = None,
        known_jobs: Any = ...,
    ) -> dict[str, Any]:
        """Change latency ("lo-hi", [lo, hi] or seconds), rate ("5/10" or rate_calls/rate_window),
        count_throttled, clock_skew, known_jobs ([[spId, jobId], ...] or None = any)."""
        if rate is not None:
            rate_calls, rate_window = parse_rate(rate)
        self.limiter.configure(calls=rate_calls, window=rate_window, count_throttled=count_throttled)
        with self._lock:
            if latency is not ...:
                self.latency = parse_latency(latency)
            if clock_skew is not None:
                self.clock_skew = float(clock_skew)
            if known_jobs is not ...:
                self.known_jobs = None if known_jobs is None else {tuple(j) for j in known_jobs}
        return self.config()

    def config(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency": list(self.latency),
                "rate_calls": self.limiter.calls,
                "rate_window": self.limiter.window,
                "count_throttled": self.limiter.count_throttled,
                "clock_skew": self.clock_skew,
                "known_jobs": None if self.known_jobs is None else sorted(list(j) for j in self.known_jobs),
            }

    # --- fault script --------------------------------------------------------------------------
    def script(self, object_id: str, *answers: Mapping[str, Any]) -> None:
        """Queue canned answers for calls whose first subject has `object_id` ("*" = any call).

        Each answer: {"status": 503, "headers": {...}, "body": <json or raw string>, "delay": s,
        "reset": bool, "key": <raw str>, "value": <raw str>}. With key/value the body is a
        stringKeyStringValuePair holding those raw strings; a 200 without body/key/value is the
        normal generated (or golden) answer; other statuses without body get a Graph error body.
        """
        with self._lock:
            queue = self._script.setdefault(object_id, deque())
            for answer in answers:
                if not isinstance(answer, Mapping):
                    raise TypeError("each scripted answer must be a JSON object")
                queue.append(dict(answer))

    def set_script(self, script: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Replace the whole script: {objectId: [answer, ...]}."""
        with self._lock:
            self._script.clear()
        for object_id, answers in script.items():
            self.script(object_id, *answers)

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    def pending_script(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {k: copy.deepcopy(list(v)) for k, v in self._script.items() if v}

    def _pop_script(self, object_id: str | None) -> dict[str, Any] | None:
        with self._lock:
            for key in (object_id, "*"):
                if key is not None and self._script.get(key):
                    return self._script[key].popleft()
        return None

    # --- scope and ownership ------------------------------------------------------------------
    def set_out_of_scope(self, object_id: str, calls: int = 1) -> dict[str, int]:
        """The next `calls` provisionOnDemand calls for `object_id` come back Skipped with
        NotEffectivelyEntitled, as while an assignment has not applied yet; then it is in scope."""
        with self._lock:
            self._out_of_scope[object_id] = int(calls)
            return dict(self._out_of_scope)

    def out_of_scope(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._out_of_scope.items() if v > 0}

    def clear_out_of_scope(self) -> None:
        with self._lock:
            self._out_of_scope.clear()

    def _take_out_of_scope(self, object_id: str | None) -> bool:
        with self._lock:
            left = self._out_of_scope.get(object_id or "", 0)
            if left > 0:
                self._out_of_scope[object_id or ""] = left - 1
            return left > 0

    def set_owners(self, service_principal_id: str, owners: Iterable[str]) -> dict[str, list[str]]:
        """Who owns the service principal. A token holding only Application.ReadWrite.OwnedBy whose
        `oid` is not listed gets Graph's 401 UnknownError with an empty message; service principals
        without a list here accept OwnedBy as before."""
        with self._lock:
            self._owners[service_principal_id] = list(owners)
            return copy.deepcopy(self._owners)

    def owners(self) -> dict[str, list[str]]:
        with self._lock:
            return copy.deepcopy(self._owners)

    def clear_owners(self) -> None:
        with self._lock:
            self._owners.clear()

    def owns(self, service_principal_id: str, object_id: str | None) -> bool:
        with self._lock:
            owners = self._owners.get(service_principal_id)
        return owners is None or object_id in owners

    # --- synchronization jobs ------------------------------------------------------------------
    def set_job(self, service_principal_id: str, job_id: str, *, code: str = "Active",
                quarantine: Mapping[str, Any] | None = None, template_id: str | None = None,
                schedule: Mapping[str, Any] | None = None, http_status: int | None = None) -> dict[str, Any]:
        """Make GET .../jobs/{job_id} answer this status (code Active, Paused, Quarantine, ...).

        A Quarantine without `quarantine` details gets typical ones; `http_status` (e.g. 404, 503)
        makes the GET fail with a Graph error instead. A job set here exists even when `known_jobs`
        does not list it. Returns the synchronizationJob the GET will answer."""
        if code not in JOB_STATUS_CODES:
            raise ValueError(f"code must be one of {JOB_STATUS_CODES}, got {code!r}")
        with self._lock:
            self._jobs[(service_principal_id, job_id)] = {
                "code": code, "quarantine": copy.deepcopy(dict(quarantine)) if quarantine else None,
                "templateId": template_id, "schedule": copy.deepcopy(dict(schedule)) if schedule else None,
                "http_status": http_status,
            }
        return self.job(service_principal_id, job_id)

    def clear_jobs(self) -> None:
        with self._lock:
            self._jobs.clear()

    def clear_schemas(self) -> None:
        with self._lock:
            self._schemas.clear()

    def set_schema(self, service_principal_id: str, job_id: str, rules: Iterable[Mapping[str, Any]] | None = None,
                   *, http_status: int | None = None) -> dict[str, Any]:
        """Make GET .../jobs/{job_id}/schema answer these synchronizationRules (each {id, name,
        sourceDirectoryName, targetDirectoryName, objectMappings: [{sourceObjectName, targetObjectName,
        enabled}]}), or fail with `http_status`. Unconfigured jobs answer DEFAULT_SCHEMA_RULES."""
        with self._lock:
            self._schemas[(service_principal_id, job_id)] = {
                "rules": copy.deepcopy([dict(r) for r in rules]) if rules is not None else None,
                "http_status": http_status}
        return self.schema(service_principal_id, job_id)

    def schema(self, service_principal_id: str, job_id: str) -> dict[str, Any]:
        with self._lock:
            cfg = copy.deepcopy(self._schemas.get((service_principal_id, job_id)) or {})
        rules = cfg.get("rules")
        if rules is None:
            rules = copy.deepcopy(DEFAULT_SCHEMA_RULES)
        return {"id": job_id, "version": "date:2026-01-01T00:00:00Z", "directories": [],
                "synchronizationRules": rules}

    def configured_schemas(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"servicePrincipalId": sp, "jobId": job, **copy.deepcopy(cfg)}
                    for (sp, job), cfg in self._schemas.items()]

    def start_calls(self, service_principal_id: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        """The POST .../start calls received (answered or not), oldest first."""
        return [c for c in self.calls() if c["route"] == "start_job"
                and (service_principal_id is None or c["servicePrincipalId"] == service_principal_id)
                and (job_id is None or c["jobId"] == job_id)]

    def configured_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"servicePrincipalId": sp, "jobId": job, **copy.deepcopy(cfg)}
                    for (sp, job), cfg in self._jobs.items()]

    def job(self, service_principal_id: str, job_id: str) -> dict[str, Any]:
        """The synchronizationJob resource as Graph shapes it."""
        with self._lock:
            cfg = copy.deepcopy(self._jobs.get((service_principal_id, job_id)) or {})
        code = cfg.get("code") or "Active"
        quarantine = cfg.get("quarantine")
        now = time.time()
        if code == "Quarantine" and quarantine is None:
            quarantine = {
                "currentBegan": _iso(now - 3600), "nextAttempt": _iso(now + 23 * 3600),
                "reason": "EncounteredQuarantineException", "seriesBegan": _iso(now - 3600), "seriesCount": 1,
                "error": {"code": "SystemForCrossDomainIdentityManagementCredentialsInvalid",
                          "message": "The credentials to the target system were rejected.",
                          "tenantActionable": True},
            }
        schedule = cfg.get("schedule") or {"expiration": None, "interval": "PT40M",
                                           "state": "Disabled" if code == "Paused" else "Active"}
        return {
            "id": job_id,
            "templateId": cfg.get("templateId") or "scim",
            "schedule": schedule,
            "status": {
                "code": code, "countSuccessiveCompleteFailures": 0, "escrowsPruned": False,
                "lastExecution": None, "lastSuccessfulExecution": None, "lastSuccessfulExecutionWithExports": None,
                "progress": [], "quarantine": quarantine,
                "steadyStateFirstAchievedTime": "0001-01-01T00:00:00Z",
                "steadyStateLastAchievedTime": "0001-01-01T00:00:00Z",
                "synchronizedEntryCountByType": [], "troubleshootingUrl": None,
            },
            "synchronizationJobSettings": [],
        }

    def _job_config(self, service_principal_id: str, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self._jobs.get((service_principal_id, job_id)))

    # --- call log ------------------------------------------------------------------------------
    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._log)

    def reset_calls(self) -> None:
        """Forget the call log, the rate window and the throttle counter."""
        with self._lock:
            self._log.clear()
            self.throttled = 0
        self.limiter.reset()

    def max_in_window(self, window: float | None = None, *, counted_only: bool = False) -> int:
        """Max arrivals in any sliding window of `window` seconds (default: the rate window)."""
        window = self.limiter.window if window is None else float(window)
        with self._lock:
            times = [c["arrival"] for c in self._log if c["counted"] or not counted_only]
        return max_in_window(times, window)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = Counter(str(c["status"]) if not c["reset"] else "reset" for c in self._log)
            scripted = sum(1 for c in self._log if c["scripted"])
            calls = len(self._log)
            throttled = self.throttled
        return {
            "calls": calls,
            "throttled": throttled,
            "max_in_window": self.max_in_window(),
            "scripted": scripted,
            "by_status": dict(by_status),
            "rate_calls": self.limiter.calls,
            "rate_window": self.limiter.window,
            "count_throttled": self.limiter.count_throttled,
        }

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            record["seq"] = next(self._seq)
            self._log.append(record)

    def _update(self, record: dict[str, Any], **fields: Any) -> None:
        with self._lock:
            record.update(fields)

    def _sleep_latency(self, record: dict[str, Any] | None = None) -> None:
        lo, hi = self.latency
        if hi > 0:
            with self._lock:
                delay = self._rng.uniform(lo, hi)
                if record is not None:
                    record["latency"] = delay  # what the benchmark subtracts from end-to-end latency
            time.sleep(delay)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _redact_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key == "authorization":
            scheme = value.split(" ", 1)[0] if value else ""
            value = f"{scheme} <redacted>" if scheme else "<redacted>"
        out[key] = value
    return out


@dataclass
class Call:
    """One Graph request as a route handler sees it: parsed once, authenticated once."""

    handler: "_GraphHandler"
    record: dict[str, Any]
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    body_error: str | None
    claims: dict[str, Any] | None
    auth_error: str | None
    seen: dict[str, Any]
    base_headers: dict[str, str]

    @property
    def sim(self) -> "GraphSimulator":
        return self.handler.server

    @property
    def graph_root(self) -> str:
        aud = (self.claims or {}).get("aud")
        return aud if isinstance(aud, str) and aud.startswith("https://") else "https://graph.microsoft.com"

    def error(self, status: int, code: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        self.sim._update(self.record, status=status)
        self.handler.send_json(status, graph_error(code, message, self.base_headers["request-id"],
                                                   self.base_headers["client-request-id"]),
                               headers={**self.base_headers, **(extra or {})})

    def answer(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        self.sim._update(self.record, status=status)
        self.handler.send_json(status, payload, headers=self.base_headers, content_type=content_type)

    def deny_unauthenticated(self) -> bool:
        """The shared 401: True (and answered) when the bearer token did not verify."""
        if self.claims is not None:
            return False
        self.error(401, "InvalidAuthenticationToken", self.auth_error or "Access token validation failure.",
                   {"WWW-Authenticate": WWW_AUTHENTICATE})
        return True

    def deny_without_role(self, roles: frozenset[str]) -> bool:
        """The shared 403: True (and answered) when the token holds none of `roles`."""
        held = (self.claims or {}).get("roles") or []
        if roles.intersection(held if isinstance(held, list) else []):
            return False
        self.error(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")
        return True

    def deny(self, roles: frozenset[str]) -> bool:
        return self.deny_unauthenticated() or self.deny_without_role(roles)

    def deny_unknown_job(self, configured: bool) -> bool:
        sp, job_id = self.params["servicePrincipalId"], self.params["jobId"]
        known = self.sim.known_jobs
        if configured or known is None or (sp, job_id) in known:
            return False
        self.error(404, "Request_ResourceNotFound", f"Resource '{sp}' or job '{job_id}' does not exist.")
        return True

    def deny_configured_failure(self, status: Any) -> bool:
        if not status:
            return False
        status = int(status)
        self.error(status, _STATUS_CODES.get(status, "UnknownError"), f"Configured {status} answer for this job.")
        return True


def _verify_token(authorization: str, sim: "GraphSimulator") -> tuple[dict[str, Any] | None, str | None, dict]:
    """(verified claims or None, why not, the claims as seen even when unverified: for the log)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    seen = (unverified_claims(token) if token else None) or {}
    if not authorization:
        return None, "Access token is empty.", seen
    if scheme.lower() != "bearer" or not token:
        return None, "Access token validation failure: the Authorization header is not a Bearer token.", seen
    try:
        claims = sim.signer.decode(token, audiences=sim.audiences, leeway=sim.clock_skew)
    except TokenError as exc:
        return None, str(exc), seen
    return claims, None, claims


class _GraphHandler(SimHandler):
    server: GraphSimulator

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # --- admin ---------------------------------------------------------------------------------
    def _admin(self, path: str, query: str) -> None:
        sim = self.server
        method = self.command
        try:
            body = parse_json_body(self.read_body()) if method in ("POST", "PUT", "PATCH") else {}
        except ValueError as exc:
            self.send_json(400, {"error": f"bad admin body: {exc}"})
            return
        try:
            route = ADMIN_ROUTES.get((path, method))
            if route is None:
                self.send_json(404, {"error": f"No admin route {method} {path}"})
            else:
                self.send_json(200, route(sim, body, {k: v[-1] for k, v in parse_qs(query).items()}))
        except (KeyError, TypeError, ValueError) as exc:
            self.send_json(400, {"error": f"{exc.__class__.__name__}: {exc}"})

    # --- Graph ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        raw_path, _, query = self.raw_target.partition("?")
        if raw_path.startswith("/_sim/"):
            self._admin(raw_path, query)
            return
        call, route = self._parse(raw_path, query)
        if route is None:
            self._no_route(call, raw_path)
            return
        route.handler(call)

    def _read_json(self) -> tuple[Any, str | None, str]:
        text = self.read_body().decode("utf-8", errors="replace")
        if not text.strip():
            return None, None, text
        try:
            return json.loads(text), None, text
        except ValueError as exc:
            return None, str(exc), text

    def _parse(self, raw_path: str, query: str) -> tuple[Call, "Route | None"]:
        """Record the arrival and verify its token (acted on by each route in its own order)."""
        sim = self.server
        body, body_error, body_text = self._read_json()
        segments_raw = raw_path.split("/")[1:] if raw_path.startswith("/") else [raw_path]
        segments = [unquote(s) for s in segments_raw]
        route, params = _match(self.command, segments)
        request_id = str(uuid.uuid4())
        client_request_id = self.headers.get("client-request-id") or request_id
        record: dict[str, Any] = {
            "seq": 0, "arrival": self.arrival, "wall_time": self.arrival_wall, "method": self.command,
            "raw_path": raw_path, "raw_target": self.raw_target, "query": query, "segments": segments,
            "route": route.name if isinstance(route, Route) else None, "version": params.get("version"),
            "servicePrincipalId": params.get("servicePrincipalId"), "jobId": params.get("jobId"),
            "headers": _redact_headers(self.headers), "body": body,
            "raw_body": body_text if body_error is not None else None, "objectId": first_object_id(body),
            "tid": None, "auth": None, "status": None, "reset": False, "scripted": False, "counted": False,
            "throttled": False, "request_id": request_id, "client_request_id": client_request_id,
        }
        sim._append(record)
        claims, auth_error, seen = _verify_token(self.headers.get("Authorization") or "", sim)
        sim._update(record, tid=claims.get("tid") if claims else None, auth={
            "valid": claims is not None, "error": auth_error,
            "aud": seen.get("aud"), "tid": seen.get("tid"), "appid": seen.get("appid"),
            "roles": seen.get("roles"), "exp": seen.get("exp"),
        })
        call = Call(self, record, params, {k: v[-1] for k, v in parse_qs(query).items()}, body, body_error,
                    claims, auth_error, seen,
                    {"request-id": request_id, "client-request-id": client_request_id})
        return call, route if isinstance(route, Route) else None

    def _no_route(self, call: Call, raw_path: str) -> None:
        if _path_known(call.record["segments"]):
            call.error(405, "Request_BadRequest", f"The request method '{self.command}' is not allowed for the resource.")
        else:
            call.error(404, "Request_ResourceNotFound", f"Resource not found for the path '{raw_path}'.")


def _match_template(template: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(template) != len(segments):
        return None
    params: dict[str, str] = {}
    for tpl, seg in zip(template, segments):
        if tpl.startswith("{"):
            if tpl == "{version}" and seg not in VERSIONS:
                return None
            params[tpl[1:-1]] = seg
        elif tpl != seg:
            return None
    return params


def _match(method: str, segments: list[str]) -> tuple["Route | None", dict[str, str]]:
    for route in ROUTES:
        params = _match_template(route.template, segments)
        if params is not None and route.method == method:
            return route, params
    return None, {}


def _path_known(segments: list[str]) -> bool:
    """Whether some route serves this path with another method (405 rather than 404)."""
    return any(_match_template(route.template, segments) is not None for route in ROUTES)


# --- route handlers ------------------------------------------------------------------------------
def provision_on_demand(call: Call) -> None:
    """Script, then 401, then the rate window, then 403, then the body (see the module docstring)."""
    sim = call.sim
    answer = sim._pop_script(call.record["objectId"])
    if answer is not None:
        sim.limiter.record((call.claims or {}).get("tid") or call.seen.get("tid") or "unknown", call.handler.arrival)
        sim._update(call.record, scripted=True, counted=True)
        _scripted(call, answer)
        return
    if call.deny_unauthenticated() or _throttled(call):
        return
    if call.deny_without_role(REQUIRED_ROLES) or _deny_not_owner(call):
        sim._sleep_latency()
        return
    if _body_rejected(call) or call.deny_unknown_job(False):
        sim._sleep_latency()
        return
    sim._sleep_latency(call.record)
    _success(call)


def _deny_not_owner(call: Call) -> bool:
    """Application.ReadWrite.OwnedBy works only for an owner of the service principal (the
    enterprise app, not the app registration); Graph answers anyone else 401 UnknownError with an
    empty message."""
    roles = (call.claims or {}).get("roles") or []
    if "Synchronization.ReadWrite.All" in roles or call.sim.owns(call.params["servicePrincipalId"],
                                                                 (call.claims or {}).get("oid")):
        return False
    call.error(401, "UnknownError", "")
    return True


def _throttled(call: Call) -> bool:
    sim = call.sim
    admitted, retry_after, counted = sim.limiter.admit(call.claims["tid"], call.handler.arrival)
    sim._update(call.record, counted=counted)
    if admitted:
        return False
    with sim._lock:
        sim.throttled += 1
    sim._update(call.record, throttled=True)
    call.error(429, "TooManyRequests",
               "Too many requests: provisionOnDemand allows "
               f"{sim.rate_calls} requests per {sim.rate_window:g} seconds. Retry after {retry_after} seconds.",
               {"Retry-After": str(retry_after)})
    return True


def _body_rejected(call: Call) -> bool:
    if call.body_error is not None:
        call.error(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type header is "
                                      f"set and payload is of valid JSON format. ({call.body_error})")
        return True
    try:
        validate_provision_body(call.body)
    except BodyError as exc:
        call.error(400, exc.code, exc.message)
        return True
    return False


@dataclass(frozen=True)
class _Job:
    sp: str
    job_id: str
    cfg: dict[str, Any] | None  # set_job's configuration
    schema: dict[str, Any] | None  # set_schema's configuration


def _checked_job(call: Call, roles: frozenset[str], *, schema_makes_it_known: bool, failing: str) -> _Job | None:
    """The job once the shared auth checks pass, the job is known and its configured failure
    (`failing`: "cfg" or "schema") is not set; None when one of them answered already."""
    if call.deny(roles):
        return None
    sp, job_id = call.params["servicePrincipalId"], call.params["jobId"]
    with call.sim._lock:
        schema = copy.deepcopy(call.sim._schemas.get((sp, job_id)))
    job = _Job(sp, job_id, call.sim._job_config(sp, job_id), schema)
    known = job.cfg is not None or (schema_makes_it_known and job.schema is not None)
    if call.deny_unknown_job(known) or call.deny_configured_failure((getattr(job, failing) or {}).get("http_status")):
        return None
    return job


def get_job(call: Call) -> None:
    job = _checked_job(call, JOB_READ_ROLES, schema_makes_it_known=False, failing="cfg")
    if job is not None:
        call.answer(200, {"@odata.context": f"{call.graph_root}/{call.params['version']}/$metadata#servicePrincipals"
                                            f"('{job.sp}')/synchronization/jobs/$entity", **call.sim.job(job.sp, job.job_id)})


def get_schema(call: Call) -> None:
    """Like GET job: neither scripted nor rate limited."""
    job = _checked_job(call, JOB_READ_ROLES, schema_makes_it_known=True, failing="schema")
    if job is not None:
        call.answer(200, call.sim.schema(job.sp, job.job_id))


def start_job(call: Call) -> None:
    """Start clears quarantine and resumes a paused job; neither scripted nor rate limited."""
    job = _checked_job(call, REQUIRED_ROLES, schema_makes_it_known=True, failing="cfg")
    if job is None:
        return
    call.sim.set_job(job.sp, job.job_id, code="Active", template_id=(job.cfg or {}).get("templateId"), schedule=None)
    call.sim._update(call.record, status=204)
    call.handler.send_bytes(204, b"", content_type=None, headers=call.base_headers)


def _success(call: Call) -> None:
    sim = call.sim
    in_scope = not sim._take_out_of_scope(call.record["objectId"])
    golden = sim.golden.get(call.record["objectId"] or "")
    if golden is not None and in_scope:
        payload = golden["response"]
    else:
        subject = call.body["parameters"][0]["subjects"][0]
        job = sim._job_config(call.params["servicePrincipalId"], call.params["jobId"]) or {}
        payload = {"@odata.context": odata_context(call.graph_root, call.params.get("version") or "v1.0"),
                   **generate_success(subject, status_info=job.get("templateId") == CROSS_TENANT_TEMPLATE,
                                      in_scope=in_scope)}
    call.answer(200, payload, content_type=SUCCESS_CONTENT_TYPE)


def _scripted_bytes(call: Call, answer: dict[str, Any], status: int) -> bytes | None:
    """The scripted body, or None for a 200 that gets the normal answer."""
    if "key" in answer or "value" in answer:
        return json.dumps({
            "@odata.context": odata_context("https://graph.microsoft.com", call.params.get("version") or "v1.0"),
            "key": answer.get("key", ""), "value": answer.get("value", ""),
        }).encode("utf-8")
    if "body" in answer:
        b = answer["body"]
        return b.encode("utf-8") if isinstance(b, str) else json.dumps(b).encode("utf-8")
    if status == 200 and first_object_id(call.body) is not None:
        return None
    code = _STATUS_CODES.get(status, "UnknownError")
    return json.dumps(graph_error(code, f"Scripted {status} answer.", call.base_headers["request-id"],
                                  call.base_headers["client-request-id"])).encode("utf-8")


def _scripted(call: Call, answer: dict[str, Any]) -> None:
    delay = float(answer.get("delay") or 0)
    if delay > 0:
        time.sleep(delay)
    if answer.get("reset"):
        call.sim._update(call.record, reset=True)
        call.handler.reset_connection()
        return
    status = int(answer.get("status", 200))
    raw = _scripted_bytes(call, answer, status)
    if raw is None:
        _success(call)
        return
    call.sim._update(call.record, status=status)
    call.handler.send_bytes(status, raw, content_type="application/json",
                            headers={**call.base_headers, **(answer.get("headers") or {})})


@dataclass(frozen=True)
class Route:
    method: str
    template: tuple[str, ...]  # "{name}" segments capture the decoded segment into Call.params
    handler: Callable[[Call], None]

    @property
    def name(self) -> str:
        return self.handler.__name__


# One line per route; each handler applies the shared auth checks (Call.deny*) in its own order.
_JOB = ("{version}", "servicePrincipals", "{servicePrincipalId}", "synchronization", "jobs", "{jobId}")
ROUTES: list[Route] = [
    Route("POST", _JOB + ("provisionOnDemand",), provision_on_demand),
    Route("GET", _JOB, get_job),
    Route("GET", _JOB + ("schema",), get_schema),
    Route("POST", _JOB + ("start",), start_job),
]


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("JSON object expected")
    return body


def _add_script(sim: GraphSimulator, body: Any) -> dict[str, Any]:
    body = _object(body)
    if "script" in body:
        if body.get("replace"):
            sim.set_script(body["script"])
        else:
            for object_id, answers in body["script"].items():
                sim.script(object_id, *answers)
    else:
        answers = body.get("answers")
        sim.script(body.get("objectId", "*"), *(answers if answers is not None else [body["answer"]]))
    return sim.pending_script()


def _max_in_window(sim: GraphSimulator, query: dict[str, str]) -> dict[str, Any]:
    window = float(query["window"]) if "window" in query else None
    counted_only = query.get("counted_only", "0").lower() in ("1", "true", "yes")
    return {"max_in_window": sim.max_in_window(window, counted_only=counted_only),
            "window": sim.rate_window if window is None else window}


def _then(action: Callable[[GraphSimulator], Any], answer: Callable[[GraphSimulator], Any]):
    return lambda sim, body, query: (action(sim), answer(sim))[1]


# (path, method) -> fn(simulator, body, query) giving the JSON answer. Each collection answers its
# current content after a change, so a test can check what it configured in one round trip.
ADMIN_ROUTES: dict[tuple[str, str], Callable[[GraphSimulator, Any, dict[str, str]], Any]] = {
    ("/_sim/calls", "GET"): lambda sim, body, query: sim.calls(),
    ("/_sim/calls", "DELETE"): _then(GraphSimulator.reset_calls, GraphSimulator.stats),
    ("/_sim/stats", "GET"): lambda sim, body, query: sim.stats(),
    ("/_sim/max_in_window", "GET"): lambda sim, body, query: _max_in_window(sim, query),
    ("/_sim/script", "GET"): lambda sim, body, query: sim.pending_script(),
    ("/_sim/script", "DELETE"): _then(GraphSimulator.clear_script, GraphSimulator.pending_script),
    ("/_sim/script", "POST"): lambda sim, body, query: _add_script(sim, body),
    ("/_sim/config", "GET"): lambda sim, body, query: sim.config(),
    ("/_sim/config", "POST"): lambda sim, body, query: sim.configure(**_object(body)),
    ("/_sim/jobs", "GET"): lambda sim, body, query: sim.configured_jobs(),
    ("/_sim/jobs", "DELETE"): _then(GraphSimulator.clear_jobs, GraphSimulator.configured_jobs),
    # {"servicePrincipalId", "jobId", "code", "quarantine"?, "templateId"?, "schedule"?, "httpStatus"?}
    ("/_sim/jobs", "POST"): lambda sim, body, query: sim.set_job(
        _object(body)["servicePrincipalId"], body["jobId"], code=body.get("code", "Active"),
        quarantine=body.get("quarantine"), template_id=body.get("templateId"),
        schedule=body.get("schedule"), http_status=body.get("httpStatus")),
    # {"objectId", "calls"?}: the next `calls` (1) calls for it answer Skipped / NotEffectivelyEntitled.
    ("/_sim/out_of_scope", "GET"): lambda sim, body, query: sim.out_of_scope(),
    ("/_sim/out_of_scope", "POST"): lambda sim, body, query: sim.set_out_of_scope(
        _object(body)["objectId"], body.get("calls", 1)),
    ("/_sim/out_of_scope", "DELETE"): _then(GraphSimulator.clear_out_of_scope, GraphSimulator.out_of_scope),
    # {"servicePrincipalId", "owners": [oid, ...]}: OwnedBy tokens of anyone else get 401 UnknownError.
    ("/_sim/owners", "GET"): lambda sim, body, query: sim.owners(),
    ("/_sim/owners", "POST"): lambda sim, body, query: sim.set_owners(
        _object(body)["servicePrincipalId"], body["owners"]),
    ("/_sim/owners", "DELETE"): _then(GraphSimulator.clear_owners, GraphSimulator.owners),
    ("/_sim/schemas", "GET"): lambda sim, body, query: sim.configured_schemas(),
    ("/_sim/schemas", "DELETE"): _then(GraphSimulator.clear_schemas, GraphSimulator.configured_schemas),
    # {"servicePrincipalId", "jobId", "synchronizationRules"?, "httpStatus"?}
    ("/_sim/schemas", "POST"): lambda sim, body, query: sim.set_schema(
        _object(body)["servicePrincipalId"], body["jobId"], body.get("synchronizationRules"),
        http_status=body.get("httpStatus")),
}
