"""Backpressure at the HTTP door without booking (fast intake, issue 13).

The door no longer books slots (the queue door does, in batches); it peeks at the shared timeline
(a read, not the receive-and-update of a booking) and refuses with 503 BacklogTooLong when the
calls would be booked further out than MAX_EXPECTED_WAIT_HOURS. Peek sees only a visible message
(https://learn.microsoft.com/en-us/rest/api/storageservices/peek-messages): while a booker holds
the timeline for its few milliseconds, the last copy seen is used. A copy is reused for
PEEK_SECONDS per process, so the door refuses within about a second of the backlog reaching the
limit; posts accepted in that second are booked beyond it, never dropped.
"""
from __future__ import annotations

import time
from collections import Counter

from shared.errors import BacklogTooLong
from shared.models import WorkItem
from shared.runtime import Runtime

PEEK_SECONDS = 1.0


def _timelines(rt: Runtime, item: WorkItem) -> list[str]:
    name = rt.schedule_queue(item)
    seen_at, contents = rt.timeline_peeks.get(name, (float("-inf"), []))
    if time.monotonic() - seen_at < PEEK_SECONDS:
        return contents
    peeked = [m.content for m in rt.queues.get(name).peek_messages(max_messages=32)]
    contents = peeked or contents
    rt.timeline_peeks[name] = (time.monotonic(), contents)
    return contents


def check(items: list[WorkItem], rt: Runtime) -> None:
    """Raises BacklogTooLong when booking these calls now would put one beyond MAX_EXPECTED_WAIT_HOURS."""
    limit = rt.settings.max_expected_wait_hours * 3600
    firsts = {(rt.schedule_queue(item), item.lane): item for item in items}
    for (name, lane), count in Counter((rt.schedule_queue(item), item.lane) for item in items).items():
        item = firsts[(name, lane)]
        schedule = rt.schedule_for(item)
        wait = max((schedule.wait_if_booked(text, count, lane) for text in _timelines(rt, item)), default=0.0)
        if wait > limit:
            raise BacklogTooLong(wait)
