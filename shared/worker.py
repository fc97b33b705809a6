"""The work-queue consumer: one Graph call per work item, within the shared rate lease.

Nothing here waits out a limit: when there is no capacity, Graph throttles, or a dependency is
down, the item goes back on the work queue hidden until it may go again. The one wait is short
and bounded (MAX_SLOT_WAIT_SECONDS): an item surfaces SCHEDULE_LEAD_SECONDS before its slot,
because queue visibility has whole-second steps and polling adds its own delay, and sleeps the
remainder so the call goes out on the slot.

Between taking a lease token and sending there is no storage round trip: the status row is
written first, and the request itself checks the token's deadline right before it is written
(shared/graph/client.py SendTiming), so a stall anywhere never spends a token that may be back.
A retry's wait is spent unbooked on the queue and books its slot when it surfaces, so one
failing call never moves the shared timeline for the others.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from pydantic import ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import GraphFailure, SendDeadlinePassed, StatusStoreUnavailable, validation_details
from shared.graph import job_guard as jobguard
from shared.graph.client import SendTiming
from shared.graph.decoding import decode, failure_outcome
from shared.graph.out_of_scope import decide_out_of_scope_retry
from shared.graph.retry_policy import backoff_seconds
from shared.models import ErrorInfo, Outcome, ResultMessage, WorkItem, utcnow
from shared.ratelimit.placement import hold_unbooked, hold_until_slot, place, place_now
from shared.ratelimit.token_gate import Lease, RateGate
from shared.results import callbacks
from shared.results.redaction import redact
from shared.runtime import Runtime

log = logging.getLogger(__name__)

ERROR_RESULT = "Error"  # our own result value: no provisioning outcome, see the dead-letter queue
TOKEN_RETRY_SECONDS = 0.25
TOKEN_PATIENCE_SECONDS = 1.0  # how long an item on its slot keeps asking for the slot's token
# A high call shares its slot with the normal call it displaced, and whichever asks first gets the token.
# Losing costs it a new slot and a surfacing; waiting for the next token that comes back costs the
# normal call instead, which the timeline already expects (it is rebooked at the end, once).
HIGH_TOKEN_PATIENCE_SECONDS = 4.0
STATUS_LEAD_SECONDS = 0.25  # the `calling` stamp is written this long before the slot, off the slot's path

Clock = Callable[[], float]
Sleep = Callable[[float], None]


def handle_work_message(text: str, rt: Runtime) -> None:
    try:
        item = WorkItem.model_validate_json(text)
    except ValidationError as exc:
        info = ErrorInfo(code="InvalidWorkItem", message="work queue message is not a work item",
                         details=validation_details(exc))
        rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(info, "work", text))
        return
    process(item, rt)


def process(item: WorkItem, rt: Runtime, clock: Clock = time.time, sleep: Sleep = time.sleep) -> None:
    s = rt.settings
    if item.notBefore is None:
        # Back from a retry's wait (or requeued by an operator): it takes its slot now.
        placed = place([item], rt, clock=clock)
        if not placed.due:
            return
        item = placed.booked[0]
    if item.notBefore - clock() > s.max_slot_wait_seconds:
        hold_until_slot(item, rt, clock)
        return
    # Until just before the slot, equal requests may still join this call's coalescing group.
    sleep(max(0.0, min(s.max_slot_wait_seconds, item.notBefore - STATUS_LEAD_SECONDS - clock())))
    try:
        # Before the lease: a slow identity endpoint must never hold capacity.
        token = rt.graph.token()
        # Closes the group, and before the token is taken: no storage round trip between take and send.
        item = rt.status.start_call(item)
    except (GraphFailure, StatusStoreUnavailable) as failure:
        code = failure.code if isinstance(failure, GraphFailure) else "StatusStoreUnavailable"
        _defer(item, rt, backoff_seconds(item.deferrals + 1, s.retry_base_seconds, s.retry_max_seconds), code, clock)
        return
    sleep(max(0.0, min(s.max_slot_wait_seconds, item.notBefore - clock())))
    gate = rt.gate_for(item)
    patience = HIGH_TOKEN_PATIENCE_SECONDS if item.lane == "high" else TOKEN_PATIENCE_SECONDS
    lease = _acquire(gate, patience=patience, sleep=sleep)
    if lease is None:
        # Its slot went to another call (a high-priority one, or one put back by throttling).
        _defer(item.model_copy(update={"displaced": item.displaced + 1}), rt, 0, "NoCapacity", clock)
        return
    _call(item, rt, gate, lease, token, clock)


def _call(item: WorkItem, rt: Runtime, gate: RateGate, lease: Lease, token: str, clock: Clock) -> None:
    timing = SendTiming(on_sent=lambda sent_at: gate.on_sent(lease, sent_at), send_by=lease.send_by,
                        clock=gate.clock)
    try:
        answer = rt.graph.provision_on_demand(item, token, timing)
    except SendDeadlinePassed as late:
        gate.finish(lease, timing)  # nothing was written: the token goes back (if it is still ours)
        log.warning("call %s not sent: %s", item.call_id, late)
        _defer(item, rt, 0, "LeaseExpired", clock)
        return
    except GraphFailure as failure:
        if failure.throttled:
            pause = failure.retry_after if failure.retry_after is not None else gate.window
            gate.throttled(lease, pause)
            rt.schedule_for(item).book(0, earliest=clock() + pause)  # later slots move back too
        else:
            gate.finish(lease, timing)
        _after_failure(item.model_copy(update={"attempts": item.attempts + 1}), rt, failure, clock)
        return
    gate.finish(lease, timing)
    _report(item.model_copy(update={"attempts": item.attempts + 1}), rt, decode(answer), clock)


def _report(item: WorkItem, rt: Runtime, outcome: Outcome, clock: Clock) -> None:
    """Emit the outcome, unless the subject was not in scope yet and is to be tried again later:
    then the work queue holds the call for OUT_OF_SCOPE_RETRY_MINUTES, nothing waits."""
    retry_in = decide_out_of_scope_retry(outcome, item, rt.settings)
    if retry_in is not None:
        _defer(item.model_copy(update={"outOfScopeRetries": item.outOfScopeRetries + 1}), rt, retry_in, "OutOfScope",
               clock)
        return
    _emit(item, rt, outcome)


def _acquire(gate: RateGate, patience: float, sleep: Sleep) -> Lease | None:
    """A token now, or within `patience` seconds for an item that is on its slot: the token for
    its slot may come back a few milliseconds after the slot when the previous call was late."""
    deadline = gate.clock() + patience
    while True:
        lease = gate.acquire()
        if lease is not None or gate.clock() >= deadline:
            return lease
        sleep(TOKEN_RETRY_SECONDS)


def _after_failure(item: WorkItem, rt: Runtime, failure: GraphFailure, clock: Clock) -> None:
    s = rt.settings
    if failure.kind == "transient" and item.attempts < s.max_attempts:
        delay = failure.retry_after if failure.retry_after is not None else backoff_seconds(
            item.attempts, s.retry_base_seconds, s.retry_max_seconds)
        log.warning("call %s failed (%s), retrying in %.0f s or later", item.call_id, failure.code, delay)
        _defer(item, rt, delay, failure.code, clock)
        return
    why = failure.message if failure.kind == "permanent" else f"gave up after {item.attempts} attempts: {failure.message}"
    give_up(item, rt, ErrorInfo(code=failure.code, message=why, details={"status": failure.status, "kind": failure.kind}),
            failure)


def give_up(item: WorkItem, rt: Runtime, info: ErrorInfo, failure: GraphFailure | None = None) -> None:
    """Dead-letter the call and report it, with the same error for every request it served."""
    log.error("call %s dead-lettered: %s", item.call_id, info.code)
    rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(
        info, "work", item.model_dump_json(exclude_none=True), requestId=item.requestId, attempts=item.attempts))
    _emit(item, rt, failure_outcome(ERROR_RESULT, info.code, info.message, failure.status if failure else None),
          failure=failure)


def _defer(item: WorkItem, rt: Runtime, seconds: float, why: str, clock: Clock) -> None:
    again = item.model_copy(update={"deferrals": item.deferrals + 1})
    if seconds <= 0:  # no wait of its own: the next free slot, at the end of the backlog
        again = place_now([again], rt, clock=clock)[0]
    else:
        hold_unbooked(again, rt, seconds)
        again = again.model_copy(update={"notBefore": clock() + seconds})  # for the status: when it may go
    rt.status.waiting(again, why)
    log.info("call %s deferred to %.1f (%s)", item.call_id, again.notBefore or 0, why)


def _emit(item: WorkItem, rt: Runtime, outcome: Outcome, failure: GraphFailure | None = None) -> None:
    """One result for the call and one for each equal request it served (coalescing)."""
    job_status = jobguard.inspect(item, rt, outcome, failure)  # None unless the failure points at the job
    result = ResultMessage(
        **outcome.model_dump(),
        resultId=item.call_id, requestId=item.requestId, correlationId=item.correlationId,
        servicePrincipalId=item.servicePrincipalId, jobId=item.jobId, ruleId=item.ruleId,
        subject=item.subject, callIndex=item.callIndex, callCount=item.callCount,
        attempts=item.attempts, receivedAt=item.receivedAt, completedAt=utcnow(), jobStatus=job_status,
        priority=item.priority, callsSaved=len(item.followers), outOfScopeRetries=item.outOfScopeRetries,
        event=item.event,
    )
    if rt.settings.redact_pii:  # before every sink: queue and Log Analytics alike
        result = redact(result, rt.settings.redact_pii_salt or "")
    results = [result] + [result.model_copy(update={
        "resultId": f.call_id, "requestId": f.requestId, "correlationId": f.correlationId,
        "callIndex": f.callIndex, "callCount": f.callCount, "receivedAt": f.receivedAt,
        "callsSaved": 0, "servedBy": result.resultId, "event": f.event,
        "subject": f.subject or result.subject}) for f in item.followers]
    for each in results:
        for sink in rt.sinks:
            sink.emit(each)
    rt.status.finish(item, results)
    urls = [item.callbackUrl] + [f.callbackUrl for f in item.followers]
    if any(urls):  # after the call and its lease: a callback never delays or costs a Graph call
        callbacks.schedule(list(zip(results, urls)), rt.queues, rt.callbacks, rt.settings)
