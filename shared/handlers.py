"""What each function does, free of azure.functions types: function_app.py only adapts to these."""
from __future__ import annotations

import logging
from typing import Mapping

from shared.deadletters import dead_letter_for
from shared.errors import (
    BacklogTooLong,
    RedeliverLater,
    RequestRejected,
    StatusStoreUnavailable,
)
from shared.intake import dry_run as dryrun
from shared.intake.rule_discovery import RuleResolver, cache_for
from shared.intake.signatures import verify as verify_signature
from shared.intake.validation import (
    AcceptedRequest,
    accept,
    check_http_request,
    decode_queue_text,
)
from shared.models import GUID_RE, WorkItem
from shared.operations import poison_sweep as poison
from shared.ratelimit.placement import place, place_now
from shared.replies import HttpReply
from shared.runtime import Runtime
from shared.worker import handle_work_message

log = logging.getLogger(__name__)


def _error_reply(rejected: RequestRejected) -> HttpReply:
    return HttpReply(rejected.status, {"error": rejected.info.model_dump(exclude_none=True)}, rejected.headers)


def _enqueue(accepted: list[AcceptedRequest], rt: Runtime) -> list[str]:
    """Record every call's status, let equal waiting calls join, and book slots for the rest; refuse
    the lot when the wait would exceed MAX_EXPECTED_WAIT_HOURS. Raises StatusStoreUnavailable when the
    status table cannot be written: the queue door retries, the HTTP door answers 503."""
    items = [item for request in accepted for item in request.items]
    limit = rt.settings.max_expected_wait_hours * 3600
    try:
        leaders = rt.status.admit(items)
        placed = place(leaders, rt, max_wait=limit)
    except Exception as exc:
        _withdraw(items, rt)
        if not isinstance(exc, BacklogTooLong):
            raise
        raise RequestRejected(
            503, "BacklogTooLong",
            f"the backlog would delay these calls by about {exc.wait / 3600:.1f} h, more than "
            f"MAX_EXPECTED_WAIT_HOURS ({rt.settings.max_expected_wait_hours:g} h); send them later",
            [{"expectedWaitSeconds": round(exc.wait)}],
            headers={"Retry-After": str(max(1, round(exc.wait - limit)))}) from None
    slots = {item.call_id: item.notBefore for item in placed.booked}
    rt.status.record_requests(
        (a.requestId, a.correlationId, a.priority,
         [item.model_copy(update={"notBefore": slots.get(item.call_id, item.notBefore)}) for item in a.items])
        for a in accepted)
    return placed.due_now


def _withdraw(items: list[WorkItem], rt: Runtime) -> None:
    # Requests accepted earlier may have joined these calls meanwhile: their calls are still made.
    heirs = rt.status.forget(items)
    if heirs:
        rt.status.booked(place_now(heirs, rt))


def _status_unavailable() -> RequestRejected:
    return RequestRejected(503, "StatusStoreUnavailable", "the request status table cannot be reached right now; "
                           "try again shortly", headers={"Retry-After": "5"})


def _rule_lookup(rt: Runtime) -> RuleResolver:
    return RuleResolver(rt.graph, cache_for(rt.settings.rule_cache_seconds))


def provision_http(body: bytes, headers: Mapping[str, str], rt: Runtime,
                   params: Mapping[str, str] | None = None) -> HttpReply:
    try:
        # First: an unsigned caller learns nothing else about what we would accept.
        verify_signature(body, headers, rt.settings)
        text = check_http_request(body, headers, rt.settings)
        accepted = accept(text, rt.settings, rules=_rule_lookup(rt))
        if dryrun.wanted(params):
            # -WhatIf: nothing booked, no capacity taken, nothing sent to Graph.
            return HttpReply(200, dryrun.describe(accepted, rt.settings))
        work = _enqueue(accepted, rt)
    except RequestRejected as rejected:
        return _error_reply(rejected)
    except StatusStoreUnavailable:
        return _error_reply(_status_unavailable())
    log.info("accepted %d request(s), %d call(s) over HTTP", len(accepted), sum(len(a.items) for a in accepted))
    return HttpReply(202, {"accepted": len(accepted), "requests": [a.summary() for a in accepted]}, work=work)


# As host.json's maxDequeueCount: the last delivery dead-letters with the reason instead of raising.
INTAKE_DELIVERIES = 5
TRANSIENT_INTAKE_CODES = {"SchemaUnavailable"}


def intake_message(raw: bytes | str, rt: Runtime, delivery: int = 1) -> list[str]:
    """A message on the intake queue; returns the work due now for the output binding. Bad input
    is dead-lettered at once: retrying cannot fix it. A job schema Graph could not serve just now
    is retried through the queue, and dead-lettered (replayable) on the last delivery."""
    original = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        accepted = accept(decode_queue_text(raw), rt.settings, rules=_rule_lookup(rt))
        work = _enqueue(accepted, rt)
    except RequestRejected as rejected:
        if rejected.info.code in TRANSIENT_INTAKE_CODES and delivery < INTAKE_DELIVERIES:
            log.warning("intake message deferred (%s), delivery %d of %d", rejected.info.code, delivery,
                        INTAKE_DELIVERIES)
            raise RedeliverLater(rejected.info.code) from None
        log.warning("intake message dead-lettered: %s", rejected.info.code)
        rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(rejected, "intake", original))
        return []
    log.info("accepted %d request(s) from the intake queue: %s", len(accepted),
             ", ".join(a.requestId for a in accepted))
    return work


def request_status(request_id: str, rt: Runtime) -> HttpReply:
    """GET /api/provision/{requestId}: where the request stands, its ETA, and its results."""
    if not GUID_RE.match(request_id or ""):
        return _error_reply(RequestRejected(400, "InvalidRequestId",
                                            "requestId must be the GUID from the 202 answer of POST /api/provision"))
    s = rt.settings
    try:
        status = rt.status.read(request_id.lower(), s.slot_spacing, s.graph_timeout_seconds)
    except StatusStoreUnavailable:
        return _error_reply(_status_unavailable())
    if status is None:
        return _error_reply(RequestRejected(404, "RequestNotFound", f"no request {request_id} is known here"))
    return HttpReply(200, status.model_dump(mode="json", exclude_none=True))


def work_message(raw: bytes | str, rt: Runtime) -> None:
    handle_work_message(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw, rt)


def lease_upkeep(rt: Runtime) -> None:
    rt.gate_for().ensure_pool()
    poison.sweep(rt)
