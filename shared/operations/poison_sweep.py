"""Messages the Functions host gave up on: it moves a message to `<queue>-poison` after
maxDequeueCount failed runs (a host that crashed each time, or storage that was down). Left
there, the request would stay "calling" or "queued" for ever and nobody would hear of it. The
upkeep timer moves them to the dead-letter queue with a reason, and a work item also gets its
`Error` result and final status, like any call given up on.
"""
from __future__ import annotations

import logging

from pydantic import ValidationError

from shared.deadletters import dead_letter_for
from shared.errors import StatusStoreUnavailable
from shared.models import ErrorInfo, WorkItem
from shared.runtime import Runtime
from shared.worker import give_up

log = logging.getLogger(__name__)

BATCH = 32
HOLD_SECONDS = 60
REASON = ("the Functions host gave up on this message after repeated failed runs (host crashes, or storage "
          "that was unreachable); see the host's logs for those runs")


def sweep(rt: Runtime) -> int:
    """Dead-letter what the host left on the poison queues; returns how many messages moved."""
    moved = 0
    swept = [(rt.settings.work_queue, "work"), (rt.settings.intake_queue, "intake")]
    if rt.settings.callback_hosts:  # a callback delivery that crashed five times (storage down, say)
        swept.append((rt.settings.callback_queue, "callback"))
    for queue, source in swept:
        client = rt.queues.get(f"{queue}-poison")
        for message in client.receive_messages(max_messages=BATCH, visibility_timeout=HOLD_SECONDS):
            _dead_letter(str(message.content), source, rt)
            client.delete_message(message)
            moved += 1
    return moved


def _dead_letter(text: str, source: str, rt: Runtime) -> None:
    info = ErrorInfo(code="RepeatedFailure", message=REASON)
    if source == "work":
        try:
            item = WorkItem.model_validate_json(text)
        except ValidationError:
            item = None
        if item is not None:
            try:
                item = rt.status.start_call(item)  # closes its group and collects who it was serving
            except StatusStoreUnavailable:
                log.warning("poisoned call %s: its group could not be closed", item.call_id)
            give_up(item, rt, info)
            return
    log.error("poisoned %s message dead-lettered", source)
    rt.queues.send_json(rt.settings.deadletter_queue, dead_letter_for(info, source, text))
