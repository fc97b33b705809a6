"""Slot booking: when each call should go, so that waiting work stays hidden in the queue.

Under backlog, a work item that became visible early would only find no token and go back,
again and again (and a long visible queue makes the Functions scale controller add instances that
do the same). So every call is booked a slot on one shared timeline, spaced by the pool's rate,
and its message stays invisible until just before that slot.

The timeline is one message in a queue of its own. Booking is a compare-and-swap made of queue
primitives: receiving the message hides it from everyone else; updating it with the new horizon
and a zero visibility timeout hands it on. A booker that dies mid-way only delays others until
the short hold runs out.

Priority. The timeline has two lanes: `horizon` ends the normal backlog, `high` the high-priority
one. A high call is booked at the first normal slot after the high lane's end, ahead of the normal
backlog, and the normal horizon moves one slot later for it, so that bookings never exceed the
rate. The normal call that was booked for that slot finds no token when it gets there and is
rebooked at the end of the backlog, into the slot kept for it (shared/worker.py); a normal call
that loses its slot a second time is rebooked on the high lane, so no call is pushed back more
than once. While normal calls wait, high calls are spaced so that they take at most
HIGH_PRIORITY_SHARE of the slots: normal work keeps the rest of the rate however many high
requests arrive.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from shared.errors import BacklogTooLong
from shared.ratelimit.token_gate import RawToken

log = logging.getLogger(__name__)

HOLD_SECONDS = 5


class ScheduleStore(Protocol):
    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]: ...
    def update_content(self, token: RawToken, content: str, visible_in: int) -> str | None: ...
    def delete(self, token: RawToken) -> None: ...
    def send(self, content: str, visible_in: int) -> None: ...
    def is_empty(self) -> bool: ...


@dataclass(frozen=True)
class Booking:
    slots: list[float]  # wall-clock epoch seconds, one per call, in order
    horizon: float      # when the timeline is free again after these calls


class Schedule:
    def __init__(self, store: ScheduleStore, spacing: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, attempts: int = 40, high_share: float = 0.8):
        self.store = store
        self.spacing = spacing
        self.high_share = high_share
        self.clock = clock
        self.sleep = sleep
        self.attempts = attempts

    def book(self, count: int, earliest: float | None = None, max_wait: float | None = None,
             lane: str = "normal") -> Booking:
        """Book `count` consecutive slots no earlier than `earliest` on a lane; refuse (BacklogTooLong)
        without booking when the last slot would be more than `max_wait` seconds away."""
        for attempt in range(self.attempts):
            held = self._hold_timeline(attempt)
            if held:
                return self._book_on(held, count, earliest, max_wait, lane)
        # The timeline could not be had (storage trouble): book nothing and let the lease decide.
        log.warning("slot timeline unavailable; booking %d call(s) for now", count)
        now = max(self.clock(), earliest or 0)
        return Booking([now] * count, now)

    def _hold_timeline(self, attempt: int) -> list[RawToken]:
        held = self.store.receive(HOLD_SECONDS, max_count=32)
        if not held and not (attempt == 0 and self._create_if_missing()):
            self.sleep(0.02 + 0.01 * attempt)  # another booker holds it for a few milliseconds
        return held

    def _book_on(self, held: list[RawToken], count: int, earliest: float | None, max_wait: float | None,
                 lane: str) -> Booking:
        keep, extra = held[0], held[1:]
        lanes = [_lanes_of(t.content) for t in held]
        timeline = {"horizon": max(h for h, _ in lanes), "high": max(h for _, h in lanes)}
        for duplicate in extra:  # two instances created the timeline at once: merge into one
            self.store.delete(duplicate)
        now = self.clock()
        slots, updated = (self._high if lane == "high" else self._normal)(timeline, count, now, earliest or now)
        if max_wait is not None and slots and slots[-1] - now > max_wait:
            self.store.update_content(keep, json.dumps(timeline), 0)
            raise BacklogTooLong(slots[-1] - now)
        self.store.update_content(keep, json.dumps(updated), 0)
        return Booking(slots, updated["horizon"])

    def _normal(self, timeline: dict, count: int, now: float, earliest: float) -> tuple[list[float], dict]:
        start = max(timeline["horizon"], now, earliest)
        return ([start + i * self.spacing for i in range(count)],
                {**timeline, "horizon": start + count * self.spacing})

    def _high(self, timeline: dict, count: int, now: float, earliest: float) -> tuple[list[float], dict]:
        horizon = timeline["horizon"]
        start = max(timeline["high"], now, earliest)
        if horizon <= start:  # no normal backlog: the high calls simply go first
            slots = [start + i * self.spacing for i in range(count)]
            end = start + count * self.spacing
            return slots, {"horizon": max(horizon, end), "high": end}
        # Spaced by the share, each moved onto the normal grid so that it competes for exactly one
        # normal call's token.
        spacing = self.spacing / self.high_share
        slots = [horizon - math.floor((horizon - (start + i * spacing)) / self.spacing) * self.spacing
                 for i in range(count)]
        return slots, {"horizon": horizon + count * self.spacing, "high": start + count * spacing}

    def _create_if_missing(self) -> bool:
        # The count includes hidden messages, so "empty" means no timeline at all, not a busy one.
        if not self.store.is_empty():
            return False
        self.store.send(json.dumps({"horizon": 0.0}), 0)
        return True

    def wait_if_booked(self, timeline: str, count: int, lane: str = "normal") -> float:
        """Read-only: how far out the last of `count` calls would go if booked now on `lane`, given
        the timeline's content as peeked (the HTTP door refuses on it without booking)."""
        horizon, high = _lanes_of(timeline)
        now = self.clock()
        slots, _ = (self._high if lane == "high" else self._normal)({"horizon": horizon, "high": high}, count, now, now)
        return slots[-1] - now if slots else 0.0


def _lanes_of(content: str) -> tuple[float, float]:
    try:
        timeline = json.loads(content)
        return float(timeline.get("horizon", 0.0)), float(timeline.get("high", 0.0))
    except (ValueError, AttributeError, TypeError):
        return 0.0, 0.0
