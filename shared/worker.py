"""The work-queue consumer: one Graph call per work item, within the shared rate lease.

Nothing here waits out a limit: when there is no capacity, Graph throttles, or a dependency is
down, the item is booked a later slot and goes back on the work queue hidden until then. The
one wait is short and bounded (MAX_SLOT_WAIT_SECONDS): an item surfaces SCHEDULE_LEAD_SECONDS
before its slot, because queue visibility has whole-second steps and polling adds its own delay,
and sleeps the remainder so the call goes out on the slot.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from pydantic import ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import GraphFailure, StatusStoreUnavailable, validation_details
from shared.graph import job_guard as jobguard
from shared.graph.client import SendTiming
from shared.graph.decoding import decode, failure_outcome
from shared.graph.out_of_scope import decide_out_of_scope_retry
from shared.graph.retry_policy import backoff_seconds
from shared.models import ErrorInfo, Outcome, ResultMessage, WorkItem, utcnow
from shared.ratelimit.placement import hold_until_slot, place_now
from shared.ratelimit.token_gate import Lease, RateGate
from shared.results.redaction import redact
from shared.runtime import Runtime

log = logging.getLogger(__name__)

ERROR_RESULT = "Error"  # our own result value: no provisioning outcome, see the dead-letter queue
TOKEN_RETRY_SECONDS = 0.25
TOKEN_PATIENCE_SECONDS = 1.0  # how long an item on its slot keeps asking for the slot's token


def handle_work_message(text: str, rt: Runtime) -> None:
    try:
        item = WorkItem.model_validate_json(text)
    except ValidationError as exc:
        info = ErrorInfo(code="InvalidWorkItem", message="work queue message is not a work item",
                         details=validation_details(exc))
        rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(info, "work", text))
        return
    process(item, rt)


def process(item: WorkItem, rt: Runtime, sleep: Callable[[float], None] = time.sleep) -> None:
    s = rt.settings
    if item.notBefore is not None and item.notBefore - time.time() > s.max_slot_wait_seconds:
        hold_until_slot(item, rt)
        return
    try:
        # Before the lease: a slow identity endpoint must never hold capacity.
        token = rt.graph.token()
    except GraphFailure as failure:
        _defer(item, rt, backoff_seconds(item.deferrals + 1, s.retry_base_seconds, s.retry_max_seconds), failure.code)
        return
    if item.notBefore is not None:
        sleep(max(0.0, min(s.max_slot_wait_seconds, item.notBefore - time.time())))
    gate = rt.gate_for(item)
    lease = _acquire(gate, patience=TOKEN_PATIENCE_SECONDS if item.notBefore is not None else 0, sleep=sleep)
    if lease is None:
        # Its slot went to another call (a high-priority one, or one put back by throttling).
        _defer(item.model_copy(update={"displaced": item.displaced + 1}), rt, 0, "NoCapacity")
        return
    timing = SendTiming(on_sent=lambda sent_at: gate.on_sent(lease, sent_at))
    try:
        # Closes the call's coalescing group: requests that arrive from now on get a call of their own.
        item = rt.status.start_call(item)
    except StatusStoreUnavailable:
        gate.finish(lease, timing)  # nothing was sent: the token goes back at once
        _defer(item, rt, backoff_seconds(item.deferrals + 1, s.retry_base_seconds, s.retry_max_seconds),
               "StatusStoreUnavailable")
        return
    try:
        answer = rt.graph.provision_on_demand(item, token, timing)
    except GraphFailure as failure:
        if failure.status == 429:
            pause = failure.retry_after if failure.retry_after is not None else gate.window
            gate.hold_back(lease, pause)
            rt.schedule_for(item).book(0, earliest=time.time() + pause)  # later slots move back too
        else:
            gate.finish(lease, timing)
        _after_failure(item.model_copy(update={"attempts": item.attempts + 1}), rt, failure)
        return
    gate.finish(lease, timing)
    _report(item.model_copy(update={"attempts": item.attempts + 1}), rt, decode(answer))


def _report(item: WorkItem, rt: Runtime, outcome: Outcome) -> None:
    """Emit the outcome, unless the subject was not in scope yet and is to be tried again later:
    then the work queue holds the call for OUT_OF_SCOPE_RETRY_MINUTES, nothing waits."""
    retry_in = decide_out_of_scope_retry(outcome, item, rt.settings)
    if retry_in is not None:
        _defer(item.model_copy(update={"outOfScopeRetries": item.outOfScopeRetries + 1}), rt, retry_in, "OutOfScope")
        return
    _emit(item, rt, outcome)


def _acquire(gate: RateGate, patience: float, sleep: Callable[[float], None]) -> Lease | None:
    """A token now, or within `patience` seconds for an item that is on its slot: the token for
    its slot may come back a few milliseconds after the slot when the previous call was late."""
    deadline = time.monotonic() + patience
    while True:
        lease = gate.acquire()
        if lease is not None or time.monotonic() >= deadline:
            return lease
        sleep(TOKEN_RETRY_SECONDS)


def _after_failure(item: WorkItem, rt: Runtime, failure: GraphFailure) -> None:
    s = rt.settings
    if failure.kind == "transient" and item.attempts < s.max_attempts:
        delay = failure.retry_after if failure.retry_after is not None else backoff_seconds(
            item.attempts, s.retry_base_seconds, s.retry_max_seconds)
        log.warning("call %s failed (%s), retrying in %.0f s or later", item.call_id, failure.code, delay)
        _defer(item, rt, delay, failure.code)
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


def _defer(item: WorkItem, rt: Runtime, seconds: float, why: str) -> None:
    again = item.model_copy(update={"deferrals": item.deferrals + 1})
    place_now([again], rt, earliest=time.time() + seconds)
    rt.status.waiting(again, why)
    log.info("call %s deferred to slot %.1f (%s)", item.call_id, again.notBefore or 0, why)


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
    )
    if rt.settings.redact_pii:  # before every sink: queue and Log Analytics alike
        result = redact(result, rt.settings.redact_pii_salt or "")
    results = [result] + [result.model_copy(update={
        "resultId": f.call_id, "requestId": f.requestId, "correlationId": f.correlationId,
        "callIndex": f.callIndex, "callCount": f.callCount, "receivedAt": f.receivedAt,
        "callsSaved": 0, "servedBy": result.resultId}) for f in item.followers]
    for each in results:
        for sink in rt.sinks:
            sink.emit(each)
    rt.status.finish(item, results)
