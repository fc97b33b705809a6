"""Where results go, and which sinks a deployment uses (RESULTS_SINK). The queue sink is the
default; the Log Analytics sink (shared/results/log_analytics.py) is a queue sink of its own."""
from __future__ import annotations

from typing import Protocol

from shared.models import ResultMessage
from shared.queues import MAX_MESSAGE_BYTES, Queues
from shared.results.sizing import fit
from shared.settings import ResultsSink, Settings


class ResultSink(Protocol):
    def emit(self, result: ResultMessage) -> None: ...


# What identifies a result and what it says: never cut (each is bounded at intake or by the app).
RESULT_KEEP = frozenset({
    "schemaVersion", "resultId", "requestId", "correlationId", "servicePrincipalId", "jobId", "ruleId",
    "subject", "callIndex", "callCount", "attempts", "receivedAt", "completedAt", "result", "errorCode",
    "priority", "callsSaved", "servedBy", "truncated"})


def fit_for_queue(result: ResultMessage, limit: int = MAX_MESSAGE_BYTES - 1024) -> str:
    """The result as JSON of at most `limit` UTF-8 bytes (a queue message, a table property):
    the largest parts (step details, raw text, modified properties, long messages) are cut first;
    `truncated` says that it happened and `truncatedFields` which fields."""
    return fit(result, limit, keep=RESULT_KEEP, marker="truncatedFields", flag="truncated")[0]


class QueueSink:
    """Each result as one message on a queue; subclasses change only how a result is written."""

    render = staticmethod(fit_for_queue)

    def __init__(self, queues: Queues, queue_name: str):
        self._queues = queues
        self._queue_name = queue_name

    def emit(self, result: ResultMessage) -> None:
        self._queues.send_text(self._queue_name, self.render(result))


def result_sinks(settings: Settings, queues: Queues) -> list[ResultSink]:
    from shared.results.log_analytics import (
        LogsQueueSink,  # it builds on QueueSink, defined here
    )

    sinks: list[ResultSink] = []
    if settings.results_sink in (ResultsSink.QUEUE, ResultsSink.BOTH):
        sinks.append(QueueSink(queues, settings.results_queue))
    if settings.logs_enabled:
        sinks.append(LogsQueueSink(queues, settings.logs_queue))
    return sinks
