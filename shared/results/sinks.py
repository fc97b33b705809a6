"""Where results go. The queue sink is the default; others plug in beside it."""
from __future__ import annotations

from typing import Protocol

from shared.models import ResultMessage
from shared.queues import MAX_MESSAGE_BYTES, Queues


class ResultSink(Protocol):
    def emit(self, result: ResultMessage) -> None: ...


def fit_for_queue(result: ResultMessage, limit: int = MAX_MESSAGE_BYTES - 1024) -> str:
    """The result as JSON within a queue message's 64 KiB. Step details (raw attribute dumps from
    the source system) go first, then modified properties; `truncated` says that it happened."""
    text = result.model_dump_json(exclude_none=True)
    if len(text.encode()) <= limit:
        return text
    slimmer = result.model_copy(update={"truncated": True, "steps": [s.model_copy(update={"details": None}) for s in result.steps]})
    text = slimmer.model_dump_json(exclude_none=True)
    if len(text.encode()) <= limit:
        return text
    return slimmer.model_copy(update={"modifiedProperties": [], "rawValue": None}).model_dump_json(exclude_none=True)


class QueueSink:
    """Each result as one message on a queue; subclasses change only how a result is written."""

    render = staticmethod(fit_for_queue)

    def __init__(self, queues: Queues, queue_name: str):
        self._queues = queues
        self._queue_name = queue_name

    def emit(self, result: ResultMessage) -> None:
        self._queues.send_text(self._queue_name, self.render(result))
