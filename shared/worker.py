"""The work-queue consumer: one Graph call per work item, within the shared rate lease.

Nothing here waits out a limit: when there is no capacity, Graph throttles, or a dependency is
down, the item goes back on the work queue with a visibility delay and this execution ends.
"""
from __future__ import annotations

import logging
import math
import random

from pydantic import ValidationError

from .decoding import decode
from .errors import validation_details
from .graph_client import GraphFailure, SendTiming
from .intake import dead_letter_for
from .models import ErrorInfo, Outcome, ResultMessage, WorkItem, utcnow
from .retry import backoff_seconds
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 60
ERROR_RESULT = "Error"  # our own result value: no provisioning outcome, see the dead-letter queue


def handle_work_message(text: str, rt: Runtime) -> None:
    try:
        item = WorkItem.model_validate_json(text)
    except ValidationError as exc:
        info = ErrorInfo(code="InvalidWorkItem", message="work queue message is not a work item",
                         details=validation_details(exc))
        rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(info, "work", text))
        return
    process(item, rt)


def process(item: WorkItem, rt: Runtime) -> None:
    try:
        token = rt.graph.token()
    except GraphFailure as failure:
        _defer(item, rt, backoff_seconds(item.deferrals + 1, rt.settings.retry_base_seconds,
                                         rt.settings.retry_max_seconds), failure.code)
        return
    gate = rt.gate_for(item)
    lease = gate.acquire()
    if lease is None:
        _defer(item, rt, _capacity_wait(rt), "NoCapacity")
        return
    timing = SendTiming()
    try:
        answer = rt.graph.provision_on_demand(item, token, timing)
    except GraphFailure as failure:
        if failure.status == 429:
            gate.hold_back(lease, failure.retry_after or gate.window)
        else:
            gate.release(lease, timing)
        _after_failure(item.model_copy(update={"attempts": item.attempts + 1}), rt, failure)
        return
    gate.release(lease, timing)
    _emit(item.model_copy(update={"attempts": item.attempts + 1}), rt, decode(answer))


def _capacity_wait(rt: Runtime) -> float:
    s = rt.settings
    return (s.rate_limit_window_seconds / s.rate_limit_calls) * random.uniform(1.0, 2.0)


def _after_failure(item: WorkItem, rt: Runtime, failure: GraphFailure) -> None:
    s = rt.settings
    if failure.kind == "transient" and item.attempts < s.max_attempts:
        delay = failure.retry_after if failure.retry_after is not None else backoff_seconds(
            item.attempts, s.retry_base_seconds, s.retry_max_seconds)
        log.warning("call %s failed (%s), retrying in %.0f s", item.call_id, failure.code, delay)
        _defer(item, rt, delay, failure.code)
        return
    why = failure.message if failure.kind == "permanent" else f"gave up after {item.attempts} attempts: {failure.message}"
    info = ErrorInfo(code=failure.code, message=why, details={"status": failure.status, "kind": failure.kind})
    log.error("call %s dead-lettered: %s", item.call_id, failure.code)
    rt.queues.send_json(s.deadletter_queue, dead_letter_for(
        info, "work", item.model_dump_json(exclude_none=True), requestId=item.requestId, attempts=item.attempts))
    _emit(item, rt, Outcome(result=ERROR_RESULT, errorCode=failure.code, errorMessage=why))


def _defer(item: WorkItem, rt: Runtime, seconds: float, why: str) -> None:
    delay = min(MAX_VISIBILITY_SECONDS, max(1, math.ceil(seconds)))
    again = item.model_copy(update={"deferrals": item.deferrals + 1})
    rt.queues.send_json(rt.settings.work_queue, again, delay=delay)
    log.info("call %s deferred %d s (%s)", item.call_id, delay, why)


def _emit(item: WorkItem, rt: Runtime, outcome: Outcome) -> None:
    result = ResultMessage(
        **outcome.model_dump(),
        resultId=item.call_id, requestId=item.requestId, correlationId=item.correlationId,
        servicePrincipalId=item.servicePrincipalId, jobId=item.jobId, ruleId=item.ruleId,
        subject=item.subject, callIndex=item.callIndex, callCount=item.callCount,
        attempts=item.attempts, receivedAt=item.receivedAt, completedAt=utcnow(),
    )
    for sink in rt.sinks:
        sink.emit(result)
