"""Slot booking: when each call should go, so that waiting work stays hidden in the queue.

Under backlog, a work item that became visible early would only find no token and go back,
again and again (and a long visible queue makes the Functions scale controller add instances that
do the same). So every call is booked a slot on one shared timeline, spaced by the pool's rate,
and its message stays invisible until just before that slot.

The timeline is one message in a queue of its own. Booking is a compare-and-swap made of queue
primitives: receiving the message hides it from everyone else; updating it with the new horizon
and a zero visibility timeout hands it on. A booker that dies mid-way only delays others until
the short hold runs out.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .lease import RawToken

log = logging.getLogger(__name__)

HOLD_SECONDS = 5


class ScheduleStore(Protocol):
    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]: ...
    def update_content(self, token: RawToken, content: str, visible_in: int) -> None: ...
    def delete(self, token: RawToken) -> None: ...
    def send(self, content: str, visible_in: int) -> None: ...
    def is_empty(self) -> bool: ...


@dataclass
class Booking:
    slots: list[float]  # wall-clock epoch seconds, one per call, in order
    horizon: float      # when the timeline is free again after these calls

    @property
    def wait(self) -> float:
        return max(0.0, self.slots[-1] - time.time()) if self.slots else 0.0


class TooLong(Exception):
    def __init__(self, wait: float):
        super().__init__(f"expected wait {wait:.0f} s")
        self.wait = wait


class Schedule:
    def __init__(self, store: ScheduleStore, spacing: float, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, attempts: int = 40):
        self.store = store
        self.spacing = spacing
        self.clock = clock
        self.sleep = sleep
        self.attempts = attempts

    def book(self, count: int, earliest: float | None = None, max_wait: float | None = None) -> Booking:
        """Book `count` consecutive slots no earlier than `earliest`; refuse (TooLong) without
        booking when the last slot would be more than `max_wait` seconds away."""
        for attempt in range(self.attempts):
            held = self.store.receive(HOLD_SECONDS, max_count=32)
            if not held:
                if attempt == 0 and self._create_if_missing():
                    continue
                self.sleep(0.02 + 0.01 * attempt)  # another booker holds it for a few milliseconds
                continue
            keep, extra = held[0], held[1:]
            horizon = max(_horizon_of(t.content) for t in held)
            for duplicate in extra:  # two instances created the timeline at once: merge into one
                self.store.delete(duplicate)
            now = self.clock()
            start = max(horizon, now, earliest or now)
            slots = [start + i * self.spacing for i in range(count)]
            if max_wait is not None and slots and slots[-1] - now > max_wait:
                self.store.update_content(keep, json.dumps({"horizon": horizon}), 0)
                raise TooLong(slots[-1] - now)
            new_horizon = start + count * self.spacing
            self.store.update_content(keep, json.dumps({"horizon": new_horizon}), 0)
            return Booking(slots, new_horizon)
        # The timeline could not be had (storage trouble): book nothing and let the lease decide.
        log.warning("slot timeline unavailable; booking %d call(s) for now", count)
        now = max(self.clock(), earliest or 0)
        return Booking([now] * count, now)

    def _create_if_missing(self) -> bool:
        # The count includes hidden messages, so "empty" means no timeline at all, not a busy one.
        if not self.store.is_empty():
            return False
        self.store.send(json.dumps({"horizon": 0.0}), 0)
        return True


def _horizon_of(content: str) -> float:
    try:
        return float(json.loads(content).get("horizon", 0.0))
    except (ValueError, AttributeError, TypeError):
        return 0.0
