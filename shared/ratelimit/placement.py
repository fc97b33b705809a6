"""Putting work items on the work queue at their booked slots."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from shared.models import WorkItem
from shared.ratelimit.token_gate import MAX_VISIBILITY_SECONDS
from shared.runtime import Runtime


@dataclass(frozen=True)
class Placement:
    due: list[WorkItem]     # the items to send right away (booked, as in `booked`)
    booked: list[WorkItem]  # every item with its slot (notBefore), in the order given


def place(items: list[WorkItem], rt: Runtime, *, earliest: float | None = None,
          max_wait: float | None = None, clock: Callable[[], float] = time.time) -> Placement:
    """Book a slot for each item and send those not yet due with a visibility delay that ends
    SCHEDULE_LEAD_SECONDS before their slot. The items due now are returned unsent: the caller
    writes them through its queue output binding, which makes the Functions host (and devhost)
    poll the work queue at once instead of at the next polling interval.

    Raises errors.BacklogTooLong, booking nothing, when a slot would be more than `max_wait` away."""
    by_pool: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_pool[rt.pool_name(item), item.lane].append(index)
    slots: dict[int, float] = {}
    for (_, lane), indexes in by_pool.items():
        booking = rt.schedule_for(items[indexes[0]]).book(len(indexes), earliest, max_wait, lane=lane)
        slots.update(zip(indexes, booking.slots))
    booked = [item.model_copy(update={"notBefore": slots[i]}) for i, item in enumerate(items)]
    due: list[WorkItem] = []
    now = clock()
    for item in booked:
        delay = surface_at(item.notBefore or 0, rt) - now
        if delay < 1:
            due.append(item)
        else:
            rt.queues.send_text(rt.settings.work_queue, item.model_dump_json(exclude_none=True),
                                delay=min(MAX_VISIBILITY_SECONDS, math.floor(delay)))
    return Placement(due, booked)


def surface_at(slot: float, rt: Runtime) -> float:
    """When an item booked for `slot` should become visible. Items surface SCHEDULE_BATCH at a time
    on a shared grid: every poll that finds one finds its batch-mates too, which divides the empty
    polls that follow each find (the host backs off from 100 ms after every hit)."""
    s = rt.settings
    cell = s.schedule_batch * s.slot_spacing
    return math.floor(slot / cell) * cell - s.schedule_lead_seconds


def place_now(items: list[WorkItem], rt: Runtime, *, earliest: float | None = None,
              clock: Callable[[], float] = time.time) -> list[WorkItem]:
    """Like place(), for callers without an output binding: due items are sent right away.
    Returns the items as booked."""
    placed = place(items, rt, earliest=earliest, clock=clock)
    for item in placed.due:
        rt.queues.send_text(rt.settings.work_queue, item.model_dump_json(exclude_none=True))
    return placed.booked


def hold_until_slot(item: WorkItem, rt: Runtime, clock: Callable[[], float] = time.time) -> None:
    """An item that surfaced well before its slot goes back under cover, keeping its booking."""
    delay = surface_at(item.notBefore or 0, rt) - clock()
    rt.queues.send_text(rt.settings.work_queue, item.model_dump_json(exclude_none=True),
                        delay=min(MAX_VISIBILITY_SECONDS, max(1, math.floor(delay))))


def hold_unbooked(item: WorkItem, rt: Runtime, seconds: float) -> None:
    """Put an item back without a slot, hidden for `seconds`: it books one when it surfaces. A
    retry's delay thus never reserves a slot far ahead, so it cannot move the shared horizon and
    delay unrelated calls (R4)."""
    unbooked = item.model_copy(update={"notBefore": None})
    rt.queues.send_text(rt.settings.work_queue, unbooked.model_dump_json(exclude_none=True),
                        delay=min(MAX_VISIBILITY_SECONDS, max(1, math.ceil(seconds))))
