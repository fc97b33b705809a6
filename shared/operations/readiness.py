"""What the app does while its settings are invalid: answer 503 naming them, and park queue messages.

A queue-triggered function that raises makes the host deliver the message again, and after
maxDequeueCount (host.json: 5) deliveries the host moves it to `<queue>-poison`
(https://learn.microsoft.com/azure/azure-functions/functions-bindings-storage-queue-trigger#poison-messages).
Raising on a bad setting would therefore poison every message within minutes. Instead each queue
function copies its message, unchanged, through an output binding to `<queue>-parked` and returns
normally, so the host deletes the original only once the copy is written. The upkeep timer moves
parked messages back to their queue once the settings are valid again (after the fix and restart).
Output bindings use the host's own storage connection, which works whatever the app settings say.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from shared.errors import RequestRejected
from shared.intake import callers
from shared.replies import HttpReply, error_reply
from shared.settings import get_settings, settings_problem

if TYPE_CHECKING:
    from shared.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

PARKED_SUFFIX = "-parked"  # function_app.py binds "%QUEUE%-parked" to the same names
RETURN_BATCH = 32
MAX_RETURNED_PER_RUN = 4096  # a long backlog comes back over several upkeep runs, inside the function timeout


def unready_reply(detailed: bool = False) -> HttpReply | None:
    """None when the settings are valid; otherwise a 503 naming the bad settings. Only the deep
    health check (function key) shows the full problem: the anonymous routes name settings, not values."""
    problem = settings_problem()
    if problem is None:
        return None
    names = ", ".join(problem.settings) or "(see the Function App log)"
    message = (f"the app's configuration is invalid ({names}): nothing is accepted until an operator fixes "
               "these app settings and restarts the app; queued work is kept")
    details: list[dict[str, Any]] = [{"setting": name} for name in problem.settings]
    if detailed:
        details.append({"problem": str(problem)})
    return error_reply(RequestRejected(503, "SettingsInvalid", message, details, headers={"Retry-After": "300"}))


def must_park(for_logs: bool = False) -> bool:
    """Whether a queue message must be parked instead of processed. Log Analytics rows are also
    parked while RESULTS_SINK does not send them there (they would have nowhere to go)."""
    if settings_problem() is not None:
        return True
    return for_logs and not get_settings().logs_enabled


def parked_queues(rt: Runtime) -> dict[str, str]:
    """Parked queue name -> the queue its messages go back to, for what can be processed now."""
    s = rt.settings
    sources = [s.intake_queue, s.work_queue] + ([s.logs_queue] if s.logs_enabled else [])
    return {source + PARKED_SUFFIX: source for source in sources}


def return_parked(rt: Runtime) -> dict[str, int]:
    """Move parked messages back, text unchanged; returns how many went back per queue. A message
    is deleted from the parked queue only after its copy is sent: at worst it comes back twice,
    which every consumer tolerates (at-least-once delivery)."""
    moved: dict[str, int] = {}
    for parked, source in parked_queues(rt).items():
        count = _move(rt, parked, source)
        if count:
            moved[source] = count
            log.warning("returned %d parked message(s) to %s", count, source)
    return moved


def _move(rt: Runtime, parked: str, source: str) -> int:
    queue, target = rt.queues.get(parked), rt.queues.get(source)
    count = 0
    while count < MAX_RETURNED_PER_RUN:
        messages = list(queue.receive_messages(messages_per_page=RETURN_BATCH, max_messages=RETURN_BATCH,
                                               visibility_timeout=60))
        if not messages:
            break
        for message in messages:
            target.send_message(message.content, time_to_live=-1)
            queue.delete_message(message)
        count += len(messages)
    return count


def http_door(headers: Mapping[str, str], handle: Callable[[Runtime], HttpReply]) -> HttpReply:
    """The checks before every authenticated HTTP route: valid settings, then an admitted caller."""
    unready = unready_reply()
    if unready is not None:
        return unready
    # Imported here, not at the top: /api/health needs the settings only, not the clients.
    from shared.runtime import runtime

    rt = runtime()
    try:
        callers.admit(headers, rt.settings)
    except RequestRejected as rejected:
        return error_reply(rejected)
    return handle(rt)


def queue_door(park: Callable[[], None], handle: Callable[[Runtime], T], *, for_logs: bool = False) -> T | None:
    """Process a queue message, or park it (see the module docstring) and return None."""
    if must_park(for_logs):
        park()
        return None
    from shared.runtime import runtime  # as in http_door

    return handle(runtime())
