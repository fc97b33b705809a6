"""Putting work items on the work queue at their booked slots."""
from __future__ import annotations

import math
import time
from collections import defaultdict

from shared.models import WorkItem
from shared.runtime import Runtime

MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 60  # a queue message can hide for at most 7 days


def place(items: list[WorkItem], rt: Runtime, *, earliest: float | None = None,
          max_wait: float | None = None) -> list[str]:
    """Book a slot for each item and send those not yet due with a visibility delay that ends
    SCHEDULE_LEAD_SECONDS before their slot. Returns the JSON of the items due now: the caller
    writes them through its queue output binding, which makes the Functions host (and devhost)
    poll the work queue at once instead of at the next polling interval.

    Raises schedule.BacklogTooLong, booking nothing, when a slot would be more than `max_wait` away."""
    by_pool: dict[tuple[str, str], list[WorkItem]] = defaultdict(list)
    for item in items:
        by_pool[rt.pool_name(item), item.lane].append(item)
    bookings = {(pool, lane): rt.schedule_for(group[0]).book(len(group), earliest, max_wait, lane=lane)
                for (pool, lane), group in by_pool.items()}
    due_now: list[str] = []
    now = time.time()
    for pool, group in by_pool.items():
        for item, slot in zip(group, bookings[pool].slots):
            item.notBefore = slot
            text = item.model_dump_json(exclude_none=True)
            delay = surface_at(slot, rt) - now
            if delay < 1:
                due_now.append(text)
            else:
                rt.queues.send_text(rt.settings.work_queue, text, delay=min(MAX_VISIBILITY_SECONDS, math.floor(delay)))
    return due_now


def surface_at(slot: float, rt: Runtime) -> float:
    """When an item booked for `slot` should become visible. Items surface SCHEDULE_BATCH at a time
    on a shared grid: every poll that finds one finds its batch-mates too, which divides the empty
    polls that follow each find (the host backs off from 100 ms after every hit)."""
    s = rt.settings
    cell = s.schedule_batch * s.slot_spacing
    return math.floor(slot / cell) * cell - s.schedule_lead_seconds


def place_now(items: list[WorkItem], rt: Runtime, *, earliest: float | None = None) -> None:
    """Like place(), for callers without an output binding: due items are sent right away."""
    for text in place(items, rt, earliest=earliest):
        rt.queues.send_text(rt.settings.work_queue, text)


def hold_until_slot(item: WorkItem, rt: Runtime) -> None:
    """An item that surfaced well before its slot goes back under cover, keeping its booking."""
    delay = surface_at(item.notBefore or 0, rt) - time.time()
    rt.queues.send_text(rt.settings.work_queue, item.model_dump_json(exclude_none=True),
                        delay=min(MAX_VISIBILITY_SECONDS, max(1, math.floor(delay))))
