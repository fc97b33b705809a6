"""What each function does, free of azure.functions types: function_app.py only adapts to these."""
from __future__ import annotations

import logging
from typing import Mapping

from azure.core.exceptions import AzureError
from pydantic import ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import (
    BacklogTooLong,
    KeyStoreUnavailable,
    RedeliverLater,
    RequestRejected,
    StatusStoreUnavailable,
    validation_details,
)
from shared.intake import backlog, cloudevents, envelope
from shared.intake import dry_run as dryrun
from shared.intake.idempotency import SHARED_SCOPE, Answer, body_hash, idempotency_key
from shared.intake.names import NameResolver
from shared.intake.rule_discovery import RuleResolver, cache_for
from shared.intake.signatures import verify as verify_signature
from shared.intake.validation import (
    AcceptedRequest,
    accept,
    check_http_request,
    decode_queue_text,
)
from shared.models import GUID_RE, RequestStatus, WorkItem
from shared.operations import poison_sweep as poison
from shared.operations import received_sweep
from shared.operations.readiness import return_parked
from shared.ratelimit.placement import Placement, place
from shared.replies import HttpReply, error_reply
from shared.results import callbacks
from shared.runtime import Runtime
from shared.status.admission import LEAD, Admission
from shared.status.received import KEPT_SECONDS
from shared.worker import handle_work_message

log = logging.getLogger(__name__)
# Not in the Idempotency-Key draft, which leaves the replay's form open; the name Stripe uses.
REPLAYED_HEADER = "Idempotent-Replayed"


def _enqueue(accepted: list[AcceptedRequest], rt: Runtime, redelivered_on_failure: bool = False,
             bounded: bool = True) -> list[WorkItem]:
    """Record every call's status, let equal queued calls be joined, and book slots for the rest; refuse
    the lot when the wait would exceed MAX_EXPECTED_WAIT_HOURS (unless not `bounded`: requests the
    HTTP door already accepted are booked however far out). Raises StatusStoreUnavailable when the
    status table cannot be written: the queue door retries, the HTTP door answers 503. What a failed
    admit() left behind strands nobody (shared/status/admission.py): it is not withdrawn. Once the
    calls are queued, a request row that cannot be written fails the run only where a redelivery
    (`redelivered_on_failure`, the queue door) recognises the same requests and writes it again.
    Returns the work due now, for the caller's output binding."""
    admitted = rt.status.admit([item for request in accepted for item in request.items])
    placed = _place_leaders(admitted, rt, rt.settings.max_expected_wait_hours * 3600 if bounded else None)
    # Only work sent by the SDK is known to be on the queue; the output binding writes after we return.
    due = {item.call_id for item in placed.due}
    rt.status.mark_queued([item for item in placed.booked if item.call_id not in due])
    booked = {item.call_id: item for item in placed.booked}
    _record_requests(accepted, [booked.get(a.item.call_id, a.item) for a in admitted], rt, redelivered_on_failure)
    return placed.due


def _texts(work: list[WorkItem]) -> list[str]:
    """Work items as the work queue's output binding takes them."""
    return [item.model_dump_json(exclude_none=True) for item in work]


def _place_leaders(admitted: list[Admission], rt: Runtime, max_wait: float | None) -> Placement:
    """Book and send the calls that lead; on any failure the admissions are undone first."""
    try:
        return place([a.item for a in admitted if a.role == LEAD], rt, max_wait=max_wait)
    except Exception as exc:
        rt.status.forget(admitted)
        if not isinstance(exc, BacklogTooLong):
            raise
        raise _backlog_too_long(exc, rt) from None


def _backlog_too_long(exc: BacklogTooLong, rt: Runtime) -> RequestRejected:
    limit = rt.settings.max_expected_wait_hours * 3600
    return RequestRejected(
        503, "BacklogTooLong",
        f"the backlog would delay these calls by about {exc.wait / 3600:.1f} h, more than "
        f"MAX_EXPECTED_WAIT_HOURS ({rt.settings.max_expected_wait_hours:g} h); send them later",
        [{"expectedWaitSeconds": round(exc.wait)}],
        headers={"Retry-After": str(max(1, round(exc.wait - limit)))})


def _record_requests(accepted: list[AcceptedRequest], admitted: list[WorkItem], rt: Runtime,
                     redelivered_on_failure: bool) -> None:
    # The admitted calls carry their group keys and booked slots.
    by_call = {item.call_id: item for item in admitted}
    try:
        rt.status.record_requests((a.requestId, a.correlationId, a.priority, [by_call[i.call_id] for i in a.items])
                                  for a in accepted)
    except StatusStoreUnavailable:
        if redelivered_on_failure:
            raise
        log.warning("request status not recorded; the calls are queued and report their results")


def _status_unavailable() -> RequestRejected:
    return RequestRejected(503, "StatusStoreUnavailable", "the request status table cannot be reached right now; "
                           "try again shortly", headers={"Retry-After": "5"})


def _rule_lookup(rt: Runtime) -> RuleResolver:
    return RuleResolver(rt.graph, cache_for(rt.settings.rule_cache_seconds))


def _name_lookup(rt: Runtime) -> NameResolver:
    return NameResolver(rt.graph, cache_for(rt.settings.name_cache_seconds), rt.settings)


def _accept(text: str, rt: Runtime, message_id: str | None = None) -> list[AcceptedRequest]:
    accepted = accept(text, rt.settings, rules=_rule_lookup(rt), names=_name_lookup(rt), message_id=message_id)
    return _callbacks_checked(accepted, rt)


def _callbacks_checked(accepted: list[AcceptedRequest], rt: Runtime) -> list[AcceptedRequest]:
    bulk = len(accepted) > 1
    callbacks.check_requests(((f"[{i}].callbackUrl" if bulk else "callbackUrl", a.items[0].callbackUrl)
                              for i, a in enumerate(accepted) if a.items and a.items[0].callbackUrl), rt.settings)
    return accepted


def _opened(text: str, rt: Runtime) -> list[AcceptedRequest]:
    """An envelope's requests; anyone who can write the intake queue could forge one, so its
    callbacks are checked again."""
    try:
        return _callbacks_checked(envelope.opened(text), rt)
    except ValidationError as exc:
        raise RequestRejected(400, "InvalidEnvelope", "the message looks like an envelope of accepted requests "
                              "but is not one", validation_details(exc)) from None


def _fast_intake(accepted: list[AcceptedRequest], rt: Runtime) -> list[AcceptedRequest] | None:
    """The requests under their post's ids, queued for the queue door together with the POSTs this
    process answers at the same time (shared/intake/group_commit.py); None when one request is too
    large for a queue message (the door then admits the post itself)."""
    size = envelope.size(accepted)
    if size is None:
        return None
    try:
        backlog.check([item for request in accepted for item in request.items], rt)
    except BacklogTooLong as exc:
        raise _backlog_too_long(exc, rt) from None
    return rt.intake_commits.submit(accepted, size, lambda requests: _write_post(requests, rt))


def _write_post(accepted: list[AcceptedRequest], rt: Runtime) -> list[AcceptedRequest]:
    """Mark a new post received and queue its envelopes (shared/intake/envelope.py write_post)."""
    post_id, key = envelope.new_post()
    named = envelope.named(accepted, post_id, key)
    queue, marks = rt.settings.intake_queue, [(len(a.items), a.priority) for a in named]
    try:
        envelope.write_post(envelope.envelopes(named, post_id),
                            lambda: rt.status.mark_received(post_id, key, marks),
                            lambda text: rt.queues.send_text(queue, text),
                            lambda message: rt.queues.get(queue).delete_message(message))
    except AzureError as exc:
        log.warning("intake envelope not queued: %s", type(exc).__name__)
        raise RequestRejected(503, "IntakeQueueUnavailable", "the intake queue cannot be reached right now; "
                              "nothing was accepted, try again shortly", headers={"Retry-After": "5"}) from None
    return named


def _accept_http(text: str, headers: Mapping[str, str], rt: Runtime) -> list[AcceptedRequest]:
    if not cloudevents.is_cloudevent(headers):
        return _accept(text, rt)
    events = cloudevents.unwrap(text, headers)
    accepted = _accept(cloudevents.data_text(events, headers), rt)
    return cloudevents.stamp(accepted, events)


def _key_of(text: str, headers: Mapping[str, str]) -> str | None:
    """The request's idempotency key: the Idempotency-Key header, else a CloudEvent's source + id
    (a batch's events together, so a batch retried as it was is recognised)."""
    key = idempotency_key(headers)
    if key is not None or not cloudevents.is_cloudevent(headers):
        return key
    try:
        keys = [cloudevents.cloudevent_idempotency_key(e.ref()) for e in cloudevents.unwrap(text, headers)]
    except RequestRejected:
        return None  # _provision answers with what is wrong
    return keys[0] if len(keys) == 1 else cloudevents.batch_idempotency_key(keys)


def _provision(text: str, headers: Mapping[str, str], rt: Runtime, params: Mapping[str, str] | None) -> HttpReply:
    accepted = _accept_http(text, headers, rt)
    if dryrun.wanted(params):
        # -WhatIf: nothing booked, no capacity taken, nothing sent to Graph.
        return HttpReply(200, dryrun.describe(accepted, rt.settings))
    queued = _fast_intake(accepted, rt) if rt.settings.fast_intake else None
    work = [] if queued else _texts(_enqueue(accepted, rt))
    accepted = queued or accepted
    log.info("accepted %d request(s), %d call(s) over HTTP", len(accepted), sum(len(a.items) for a in accepted))
    return HttpReply(202, {"accepted": len(accepted), "requests": [a.summary() for a in accepted]}, work=work)


def _provision_once(key: str, caller: str | None, text: str, headers: Mapping[str, str], rt: Runtime,
                    params: Mapping[str, str] | None) -> HttpReply:
    """POST with an Idempotency-Key: the first use acts and its 202 is remembered; a retry with the
    same payload gets that 202 again (same requestIds) and nothing is queued twice."""
    recalled = rt.answers.recall(key, caller or SHARED_SCOPE, body_hash(text))
    if recalled.state == "replay" and recalled.answer is not None:
        return HttpReply(recalled.answer.status, recalled.answer.body, {REPLAYED_HEADER: "true"})
    if recalled.state == "mismatch":
        raise RequestRejected(422, "IdempotencyKeyReused", "this Idempotency-Key was already used with another "
                              "request body; use a new key for a new request",
                              [{"field": "Idempotency-Key", "message": "key reused with a different payload"}])
    if recalled.state != "new":
        raise RequestRejected(409, "IdempotencyKeyInProgress", "a request with this Idempotency-Key is still "
                              "being processed; retry shortly to get its answer", headers={"Retry-After": "5"})
    try:
        reply = _provision(text, headers, rt, params)
    except Exception:
        rt.answers.forget(recalled)
        raise
    if reply.status != 202:  # a dry run acted on nothing: the key stays free
        rt.answers.forget(recalled)
        return reply
    try:
        rt.answers.remember(recalled, Answer(status=reply.status, body=reply.body))
    except KeyStoreUnavailable:
        # The calls are queued: answer as accepted. A retry meets the pending key (409) until it
        # can be taken over; README "When a subject can be called twice" says what then happens.
        log.warning("accepted calls, but their Idempotency-Key answer could not be remembered")
    return reply


def provision_http(body: bytes, headers: Mapping[str, str], rt: Runtime, params: Mapping[str, str] | None = None,
                   *, method: str = "POST", path: str = "/api/provision", caller: str | None = None) -> HttpReply:
    """POST /api/provision. `caller` (the Entra ID caller, when known) scopes Idempotency-Keys."""
    signature = None
    try:
        # First: an unsigned caller learns nothing else about what we would accept.
        signature = verify_signature(body, headers, rt.settings, method=method, path=path, params=params,
                                     seen=rt.answers if rt.settings.webhook_hmac_secret else None)
        text = check_http_request(body, headers, rt.settings)
        key = _key_of(text, headers)
        reply = (_provision(text, headers, rt, params) if key is None
                 else _provision_once(key, caller, text, headers, rt, params))
    except RequestRejected as rejected:
        reply = error_reply(rejected)
    except StatusStoreUnavailable:
        reply = error_reply(_status_unavailable())
    except KeyStoreUnavailable:
        reply = error_reply(RequestRejected(503, "KeyStoreUnavailable", "the table of idempotency keys and "
                                             "signatures cannot be reached right now; nothing was accepted, try "
                                             "again shortly", headers={"Retry-After": "5"}))
    if signature is not None and reply.status >= 300:
        # Not acted on: the same signed request, retried as it is, must not be refused as a replay.
        rt.answers.forget(signature)
    return reply


# As host.json's maxDequeueCount: the last delivery dead-letters with the reason instead of raising.
INTAKE_DELIVERIES = 5
TRANSIENT_INTAKE_CODES = {"SchemaUnavailable", "DirectoryUnavailable"}


def intake_message(raw: bytes | str, rt: Runtime, delivery: int = 1, message_id: str | None = None) -> list[str]:
    """A message on the intake queue; returns the work due now for the output binding. Bad input
    is dead-lettered at once: retrying cannot fix it. A job schema Graph could not serve just now
    is retried through the queue, and dead-lettered (replayable) on the last delivery. Request ids
    come from `message_id`: every delivery of the message names the same requests."""
    original = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        text = decode_queue_text(raw)
        if envelope.is_envelope(text):
            accepted = _opened(text, rt)
            work = _admit_envelope(accepted, rt)
        else:
            accepted = _accept(text, rt, message_id=message_id)
            work = _texts(_enqueue(accepted, rt, redelivered_on_failure=True))
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


def _admit_envelope(accepted: list[AcceptedRequest], rt: Runtime) -> list[str]:
    """An envelope's requests, admitted together with those of the envelopes this process is
    handed at the same time (shared/intake/group_commit.py): one admission and one booking for all.
    Booked however far out: the HTTP door already accepted them. If the round fails, every message
    in it is delivered again, and names the same requests."""
    calls = sum(len(a.items) for a in accepted)
    per_request = rt.admission_commits.submit(accepted, calls, lambda together: _due_by_request(together, rt))
    return [text for texts in per_request for text in texts]


def _due_by_request(accepted: list[AcceptedRequest], rt: Runtime) -> list[list[str]]:
    """The work due now of each request (in order), for the output binding of its own message."""
    # A request twice in a round (a send retried by the SDK queued its envelope twice, or its message
    # was delivered again while the first delivery waited) is admitted once, else it is booked and
    # called twice. Its work goes to the later delivery: an earlier one that waited out functionTimeout
    # was abandoned by the host, its outputs discarded, and only the later one's success is sent.
    once = list({a.requestId: a for a in accepted}.values())
    due: dict[str, list[WorkItem]] = {}
    for item in _enqueue(once, rt, redelivered_on_failure=True, bounded=False):
        due.setdefault(item.requestId, []).append(item)
    return [_texts(due.pop(a.requestId, [])) for a in reversed(accepted)][::-1]


def _page_of(params: Mapping[str, str] | None) -> int:
    text = str({k.lower(): v for k, v in (params or {}).items()}.get("page", "1")).strip()
    if not text.isdigit() or int(text) < 1:
        raise RequestRejected(400, "InvalidPage", "page must be a whole number from 1",
                              [{"field": "page", "message": f"got {text[:40]!r}"}])
    return int(text)


# What a fast-intake requestId with neither a request row nor a received marker may be, besides
# one nobody was given: the marker is swept only once no intake message could still admit it.
NEVER_ADMITTED = ("; a request accepted by fast intake whose intake message was dead-lettered before it could "
                  f"be admitted is not known here from {KEPT_SECONDS / 3600:g} h after it was accepted: the "
                  "dead-letter queue holds that message and the reason")


def _read_status(request_id: str, rt: Runtime, params: Mapping[str, str] | None) -> RequestStatus:
    """The request's status: admitted, or received by fast intake and not yet admitted. Raises
    RequestRejected (no such page, no such request) and StatusStoreUnavailable."""
    s = rt.settings
    page = _page_of(params)
    status = rt.status.read(request_id, s.slot_spacing, s.graph_timeout_seconds, page)
    post = envelope.post_of(request_id) if status is None else None
    status = rt.status.received(request_id, *post) if post else status
    if status is None:
        raise RequestRejected(404, "RequestNotFound", f"no request {request_id} is known here"
                              + (NEVER_ADMITTED if post else ""))
    if page > status.pageCount:
        raise RequestRejected(400, "InvalidPage", f"request {request_id} has {status.pageCount} page(s) of calls",
                              [{"field": "page", "message": f"at most {status.pageCount}"}])
    return status


def request_status(request_id: str, rt: Runtime, params: Mapping[str, str] | None = None) -> HttpReply:
    """GET /api/provision/{requestId}[?page=n]: where the request stands, its ETA, and the results
    of the calls on that page."""
    if not GUID_RE.match(request_id or ""):
        return error_reply(RequestRejected(400, "InvalidRequestId",
                                            "requestId must be the GUID from the 202 answer of POST /api/provision"))
    try:
        status = _read_status(request_id.lower(), rt, params)
    except RequestRejected as rejected:
        return error_reply(rejected)
    except StatusStoreUnavailable:
        return error_reply(_status_unavailable())
    if rt.settings.callback_hosts:
        shown = {f"{status.requestId}:{call.callIndex}" for call in status.calls}
        states = [state for state in rt.callbacks.states(status.requestId) if state.resultId in shown]
        status = status.model_copy(update={"callbacks": states or None})
    return HttpReply(200, status.model_dump(mode="json", exclude_none=True))


def callback_message(raw: bytes | str, rt: Runtime) -> None:
    """One delivery attempt of a result to its callbackUrl (shared/results/callbacks.py)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    callbacks.deliver(text, rt.queues, rt.callbacks, rt.settings, rt.callback_http)


def work_message(raw: bytes | str, rt: Runtime) -> None:
    handle_work_message(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw, rt)


def lease_upkeep(rt: Runtime) -> None:
    rt.gate_for().ensure_pool()
    poison.sweep(rt)
    rt.answers.sweep()
    # Runs only with valid settings: what was parked while they were invalid can be processed now.
    return_parked(rt)
    received_sweep.sweep(rt)  # after return_parked: envelopes parked meanwhile are back on the intake queue
