"""Preflight: can this deployment provision right now, and if not, what must be fixed?

Read-only checks of what a deployment gets wrong most often: the identity's Graph token and app
roles, the configured synchronization job (a paused or quarantined job provisions nothing), the
queues, and the rate lease pool. Each check ends in plain words and, where something is wrong, a fix.

Used by `GET /api/health/deep` (function key); operators run the same checks from a workstation
with `python -m tools.preflight`.
The Graph token itself is never printed or returned: only claims decoded from its payload.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
from azure.storage.queue import QueueServiceClient

from shared.errors import GraphFailure
from shared.graph.client import REQUIRED_ROLES_HINT, GraphClient, job_path
from shared.operations.readiness import PARKED_SUFFIX, unready_reply
from shared.ratelimit.token_gate import pool_queue_name
from shared.replies import HttpReply
from shared.settings import Settings

Status = Literal["ok", "warn", "fail", "skip"]

FULL_ROLE = "Synchronization.ReadWrite.All"
OWNED_BY_ROLE = "Application.ReadWrite.OwnedBy"
# Claims worth showing: who the token is for and who it names. Nothing here can be replayed.
SHOWN_CLAIMS = ("aud", "tid", "appid", "oid", "idtyp", "exp")
GRANT_SCRIPT = "infra/scripts/grant-graph-permission.sh (or .ps1)"
DEEP_ROUTE = "/api/health/deep"


@dataclass
class Check:
    name: str
    status: Status
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    checks: list[Check]
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        states = {c.status for c in self.checks}
        return "fail" if "fail" in states else "warn" if "warn" in states else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "context": self.context,
                "checks": [{k: v for k, v in asdict(c).items() if v not in (None, {})} for c in self.checks]}

    def render(self) -> str:
        lines = ["Preflight: " + ", ".join(f"{k} {v}" for k, v in self.context.items()), ""]
        width = max(len(c.name) for c in self.checks)
        for c in self.checks:
            lines.append(f"  {c.status.upper():<5} {c.name:<{width}}  {c.summary}")
            if c.fix:
                lines.append(f"  {'':<5} {'':<{width}}  Fix: {c.fix}")
        fails = sum(c.status == "fail" for c in self.checks)
        warns = sum(c.status == "warn" for c in self.checks)
        verdict = {"ok": "OK: nothing to fix.",
                   "warn": f"OK with {warns} warning(s): read them before relying on this deployment.",
                   "fail": f"FAIL: {fails} thing(s) to fix" + (f", {warns} warning(s)." if warns else ".")}
        lines += ["", verdict[self.status]]
        return "\n".join(lines)


def token_claims(token: str) -> dict[str, Any] | None:
    """The JWT payload, unverified (we only read what the token says about us). None if not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


# -- checks ------------------------------------------------------------------------------------
def check_token(settings: Settings, graph: GraphClient) -> tuple[Check, str | None, dict[str, Any]]:
    try:
        token = graph.token()
    except GraphFailure as failure:
        return Check("Graph token", "fail", f"no token for {settings.graph_scope}: {failure.message}",
                     fix="In Azure, attach the user-assigned identity to the Function App and set AZURE_CLIENT_ID "
                         "to its client id. On a workstation, sign in first (az login).",
                     details={"scope": settings.graph_scope}), None, {}
    claims = token_claims(token) or {}
    shown = {k: claims[k] for k in SHOWN_CLAIMS if k in claims}
    who = ", ".join(f"{k} {shown[k]}" for k in ("tid", "oid") if k in shown)
    return (Check("Graph token", "ok", f"got a token for {settings.graph_scope}" + (f" ({who})" if who else ""),
                  details={"claims": shown}), token, claims)


def check_roles(claims: Mapping[str, Any], token_ok: bool, target_sp: str | None = None) -> Check:
    if not token_ok:
        return Check("Graph roles", "skip", "no token to read roles from")
    if not claims:
        return Check("Graph roles", "warn", "the token is not a JWT, so its app roles cannot be read")
    roles = claims.get("roles") if isinstance(claims.get("roles"), list) else []
    details = {"roles": roles}
    principal = claims.get("oid") or "<identity object id>"
    if FULL_ROLE in roles:
        return Check("Graph roles", "ok", f"{FULL_ROLE} granted", details=details)
    if OWNED_BY_ROLE in roles:
        return Check(
            "Graph roles", "warn",
            f"only {OWNED_BY_ROLE}: provisionOnDemand works only on service principals this identity owns, and "
            "restarting a job was reported to fail with it (microsoft-graph-docs-contrib issue 8800)",
            fix=f"Make sure the identity owns the enterprise app: {GRANT_SCRIPT} --mode ownedby --principal-id "
                f"{principal} --target-sp {target_sp or '<service principal id>'}; or grant {FULL_ROLE} instead "
                "(--mode sync).",
            details=details)
    have = ", ".join(roles) if roles else "none"
    return Check(
        "Graph roles", "fail", f"no Graph app role allows provisionOnDemand (roles in the token: {have})",
        fix=f"A Privileged Role Administrator runs {GRANT_SCRIPT} --principal-id {principal}. Managed identity "
            "tokens are cached for up to 24 h: restart the Function App afterwards.",
        details=details)


def check_job(settings: Settings, graph: GraphClient, token: str | None,
              service_principal_id: str | None, job_id: str | None) -> Check:
    if not (service_principal_id and job_id):
        return Check("Job", "skip",
                     "no default job configured (DEFAULT_SERVICE_PRINCIPAL_ID, DEFAULT_JOB_ID): every request "
                     "must name servicePrincipalId and jobId")
    where = {"servicePrincipalId": service_principal_id, "jobId": job_id}
    if token is None:
        return Check("Job", "skip", "no token to read the job with", details=where)
    try:
        job = graph.get_job(service_principal_id, job_id, token)
    except GraphFailure as failure:
        return _job_failure(failure, where)
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    code = str(status.get("code") or "Unknown")
    quarantine = status.get("quarantine") if isinstance(status.get("quarantine"), dict) else None
    details = {**where, "templateId": job.get("templateId"), "status": code,
               "schedule": (job.get("schedule") or {}).get("state")}
    if quarantine:
        details["quarantine"] = quarantine
    start = (f"POST {settings.graph_root}{job_path(settings.graph_api_version, service_principal_id, job_id)}/start "
             "(or Provisioning > Start provisioning in the Entra admin center), once: don't call it in a loop")
    return _judge_job(f"job {job_id}", code, quarantine, details, start)


def _judge_job(name: str, code: str, quarantine: dict[str, Any] | None, details: dict[str, Any],
               start: str) -> Check:
    lowered = code.lower()
    if lowered == "active" and not quarantine:
        return Check("Job", "ok", f"{name} is Active", details=details)
    if lowered == "quarantine" or quarantine:
        return _quarantined(name, quarantine or {}, details, start)
    if lowered == "paused":
        return Check("Job", "warn", f"{name} is Paused: its provisioning cycles are stopped",
                     fix=f"If it should run, start it: {start}.", details=details)
    return Check("Job", "warn", f"{name} has status {code}: it has not been started or is not configured",
                 fix=f"Finish the provisioning configuration in the Entra admin center, then start it: {start}.",
                 details=details)


def _quarantined(name: str, q: dict[str, Any], details: dict[str, Any], start: str) -> Check:
    error = q.get("error") if isinstance(q.get("error"), dict) else {}
    why = ", ".join(filter(None, [
        f"reason {q['reason']}" if q.get("reason") else None,
        f"since {q['currentBegan']}" if q.get("currentBegan") else None,
        f"next attempt {q['nextAttempt']}" if q.get("nextAttempt") else None,
    ]))
    cause = f" {error.get('code')}: {str(error.get('message') or '').rstrip('.')}." if error.get("code") else ""
    return Check("Job", "fail", f"{name} is in quarantine ({why or 'no details'}).{cause} A quarantined job "
                                "runs about once a day.",
                 fix=f"Fix the cause named above (for credential errors: Provisioning > Admin credentials > Test "
                     f"connection), then start the job to clear the quarantine: {start}.",
                 details=details)


def _job_failure(failure: GraphFailure, where: dict[str, Any]) -> Check:
    details = {**where, "httpStatus": failure.status, "code": failure.code}
    if failure.status == 404:
        return Check("Job", "fail", f"Graph does not know job {where['jobId']} of service principal "
                                    f"{where['servicePrincipalId']} ({failure.code})",
                     fix="DEFAULT_SERVICE_PRINCIPAL_ID must be the object id of the enterprise application's service "
                         "principal (not the app registration's appId), and DEFAULT_JOB_ID one of its jobs "
                         "(GET .../servicePrincipals/{id}/synchronization/jobs lists them).", details=details)
    if failure.status == 403:
        return Check("Job", "fail", f"Graph refused to read the job ({failure.code})",
                     fix=REQUIRED_ROLES_HINT + f" Grant it with {GRANT_SCRIPT}.", details=details)
    if failure.status == 401:
        return Check("Job", "fail", f"Graph rejected the token ({failure.code})",
                     fix="Check GRAPH_CLOUD: the token must be for the Graph root of the tenant's cloud.",
                     details=details)
    if failure.kind == "transient":
        return Check("Job", "warn", f"could not read the job now ({failure.code}): {failure.message}",
                     fix="Try again in a minute; if it persists, check outbound access to Graph.", details=details)
    return Check("Job", "fail", f"Graph answered {failure.status}: {failure}", details=details)


def queue_names(settings: Settings) -> dict[str, str]:
    names = {"INTAKE_QUEUE": settings.intake_queue, "WORK_QUEUE": settings.work_queue,
             "RESULTS_QUEUE": settings.results_queue, "DEADLETTER_QUEUE": settings.deadletter_queue,
             "LEASE_QUEUE": settings.lease_queue}
    logs_queue = getattr(settings, "logs_queue", None)
    if logs_queue:
        names["LOGS_QUEUE"] = logs_queue
    return names


def _queue_properties(service: QueueServiceClient, name: str) -> tuple[str, Any]:
    """("ok", properties) | ("missing", None) | ("forbidden", code) | ("unreachable", reason)."""
    try:
        return "ok", service.get_queue_client(name).get_queue_properties()
    except ResourceNotFoundError:
        return "missing", None
    except HttpResponseError as exc:
        if exc.status_code in (401, 403):
            return "forbidden", getattr(exc, "error_code", None) or str(exc.status_code)
        return "unreachable", f"HTTP {exc.status_code}"
    except AzureError as exc:
        return "unreachable", type(exc).__name__


def check_queues(settings: Settings, service: QueueServiceClient) -> Check:
    found: dict[str, int] = {}
    missing, forbidden, unreachable = [], [], []
    for setting, name in queue_names(settings).items():
        state, value = _queue_properties(service, name)
        if state == "ok":
            found[name] = int(value.approximate_message_count or 0)
        else:
            {"missing": missing, "forbidden": forbidden, "unreachable": unreachable}[state].append(f"{name} ({setting})")
    details = {"messages": found}
    if unreachable:
        return Check("Queues", "fail", f"cannot reach the queue service at {service.url}: {', '.join(unreachable)}",
                     fix="Check AzureWebJobsStorage__queueServiceUri (or the connection string) and that the storage "
                         "account allows this network.", details=details)
    if forbidden:
        return Check("Queues", "fail", f"the identity may not read {', '.join(forbidden)}",
                     fix="Give the app's identity Storage Queue Data Contributor on the storage account "
                         "(infra/modules/rbac.bicep does; role assignments can take a few minutes to apply).",
                     details=details)
    if missing:
        return Check("Queues", "fail", f"missing: {', '.join(missing)}",
                     fix="`azd provision` creates them. Otherwise the setting names a queue that is not in this storage "
                         "account: queue triggers on a missing queue never fire.", details=details)
    backlog = ", ".join(f"{n} {c}" for n, c in found.items())
    return Check("Queues", "ok", f"all {len(found)} queues exist (messages: {backlog})", details=details)


def check_lease_pool(settings: Settings, service: QueueServiceClient,
                     service_principal_id: str | None, job_id: str | None) -> Check:
    scope = settings.rate_limit_scope.value
    if scope != "tenant" and not (service_principal_id and (job_id or scope == "servicePrincipal")):
        return Check("Lease pool", "skip", f"RATE_LIMIT_SCOPE={scope} keeps one pool per {scope}; name a service "
                                           "principal and job to check one")
    name = pool_queue_name(settings.lease_queue, scope, service_principal_id or "", job_id or "")
    calls, window = settings.rate_limit_calls, settings.rate_limit_window_seconds
    upkeep = ("The first worker call seeds the pool, and the lease_upkeep timer repairs it every 5 minutes (run it "
              "now: POST /admin/functions/lease_upkeep with the master key): check that the Function App is "
              "running with all its functions enabled, and look for 'lease pool minted' in its logs.")
    state, props = _queue_properties(service, name)
    if state == "missing":
        # Not seeded yet is normal before the first call (the first worker call seeds the pool), so a
        # fresh deployment's availability test does not alert on it: a warning, not a failure.
        return Check("Lease pool", "warn", f"lease pool queue {name} does not exist: no call has seeded it yet",
                     fix=upkeep, details={"queue": name})
    if state != "ok":
        return Check("Lease pool", "fail", f"cannot read lease pool queue {name} ({props})",
                     fix="See the Queues check.", details={"queue": name})
    metadata = dict(props.metadata or {})
    count = int(props.approximate_message_count or 0)
    details = {"queue": name, "epoch": metadata.get("epoch"), "tokens": count,
               "mintedFor": {"calls": metadata.get("calls"), "window": metadata.get("window")},
               "configured": {"calls": calls, "window": window}}
    if not metadata.get("epoch"):
        return Check("Lease pool", "warn", f"lease pool {name} has no epoch: it has not been seeded yet", fix=upkeep,
                     details=details)
    return _judge_pool(name, metadata, count, settings, details, upkeep)


def _judge_pool(name: str, metadata: dict[str, str], count: int, settings: Settings, details: dict[str, Any],
                upkeep: str) -> Check:
    calls, window = settings.rate_limit_calls, settings.rate_limit_window_seconds
    clear = (f"Clear the queue's messages (az storage message clear --queue-name {name} --auth-mode login ...); "
             "the next worker call or upkeep run then mints a pool for the current settings.")
    minted_calls = _number(metadata.get("calls"))
    if minted_calls is not None and minted_calls > calls:
        return Check("Lease pool", "fail", f"pool {name} was minted for {metadata.get('calls')} calls but "
                                           f"RATE_LIMIT_CALLS is {calls}: it lets more calls through than allowed",
                     fix=clear, details=details)
    minted_window = _number(metadata.get("window"))
    if minted_window is not None and minted_window != float(window):
        return Check("Lease pool", "warn", f"pool {name} was minted for a {metadata.get('window')} s window but "
                                           f"RATE_LIMIT_WINDOW_SECONDS is {window}", fix=clear, details=details)
    if count < calls:
        return Check("Lease pool", "warn", f"pool {name} holds about {count} of {calls} tokens",
                     fix="Workers and the upkeep timer re-mint a pool that lost tokens; if this persists, " + upkeep[0].lower()
                         + upkeep[1:], details=details)
    return Check("Lease pool", "ok", f"pool {name} is seeded (epoch {str(metadata['epoch'])[:8]}…, about {count} "
                                     f"tokens for {calls} calls per {window} s)", details=details)


def check_parked(settings: Settings, service: QueueServiceClient) -> Check:
    """Messages parked while the settings were invalid (shared/operations/readiness.py)."""
    parked: dict[str, int] = {}
    for source in (settings.intake_queue, settings.work_queue, settings.logs_queue):
        state, props = _queue_properties(service, source + PARKED_SUFFIX)
        if state == "ok" and props.approximate_message_count:
            parked[source + PARKED_SUFFIX] = int(props.approximate_message_count)
    if not parked:
        return Check("Parked messages", "ok", "none: no message waits for valid settings")
    return Check("Parked messages", "warn", "messages parked while the settings were invalid: "
                 + ", ".join(f"{name} {count}" for name, count in parked.items()),
                 fix="With valid settings the lease_upkeep timer returns them to their queues within 5 minutes; "
                     "run it now with POST /admin/functions/lease_upkeep (master key). Log Analytics rows stay "
                     "parked while RESULTS_SINK does not send them there.",
                 details={"parked": parked})


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- the whole run -----------------------------------------------------------------------------
def check_settings() -> Check:
    # A report only exists with valid settings (invalid ones stop the CLI and make /api/health/deep
    # answer 503 naming them), but operators asked to see it said.
    return Check("Settings", "ok", "all app settings are valid")


def check_callers(settings: Settings) -> Check:
    apps, roles = len(settings.allowed_client_app_ids), len(settings.allowed_client_roles)
    details = {"easyAuth": settings.easy_auth_enabled, "allowedClientAppIds": apps, "allowedClientRoles": roles}
    if not settings.easy_auth_enabled:
        return Check("Callers", "ok", "Easy Auth off: callers use function keys (and the HMAC signature if set)",
                     details=details)
    return Check("Callers", "ok", f"Easy Auth on: Entra ID callers admitted from {apps} client application id(s) "
                                  f"and {roles} app role(s); callers without a token use function keys or HMAC",
                 details=details)


def run_preflight(settings: Settings, graph: GraphClient, queue_service: QueueServiceClient, *,
                  service_principal_id: str | None = None, job_id: str | None = None) -> Report:
    sp = service_principal_id or settings.default_service_principal_id
    job = job_id or settings.default_job_id
    token_check, token, claims = check_token(settings, graph)
    checks = [
        check_settings(),
        check_callers(settings),
        token_check,
        check_roles(claims, token is not None, sp),
        check_job(settings, graph, token, sp, job),
        check_queues(settings, queue_service),
        check_lease_pool(settings, queue_service, sp, job),
        check_parked(settings, queue_service),
    ]
    context = {"graph": f"{settings.graph_root} ({settings.graph_api_version}, {settings.graph_cloud})",
               "storage": queue_service.url}
    return Report(checks, context)


# -- HTTP --------------------------------------------------------------------------------------
def health_reply(params: Mapping[str, str]) -> HttpReply:
    """The anonymous probe: says the host answers and the settings are valid (or names the bad ones,
    without their values), and nothing else about the configuration."""
    if str(params.get("deep", "")).lower() in ("1", "true", "yes"):
        return HttpReply(401, {"error": {"code": "FunctionKeyRequired",
                                         "message": f"The deep check needs a function key: GET {DEEP_ROUTE} with "
                                                    "header x-functions-key (or ?code=)."}})
    return unready_reply() or HttpReply(200, {"status": "ok"})


def deep_health_reply(settings: Settings, graph: GraphClient, queue_service: QueueServiceClient) -> HttpReply:
    report = run_preflight(settings, graph, queue_service)
    # 503 on failure, so that an availability test pointed here alerts without parsing the body.
    return HttpReply(503 if report.status == "fail" else 200, report.to_dict())
