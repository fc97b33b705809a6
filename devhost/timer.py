"""Timer trigger: NCRONTAB (or TimeSpan interval) schedules, runOnStartup, past-due detection.

Schedules are evaluated in UTC unless WEBSITE_TIME_ZONE names an IANA zone, as on Linux plans.
Invocations of one timer never overlap; occurrences missed while an invocation ran are
collapsed into one immediate past-due run, as the host's timer does. When a singleton lock is
given, the timer only runs in the process holding it (the host runs timers on one instance).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from azure.functions.timer import TimerRequest

from devhost.functions import FunctionSpec
from devhost.host_config import HostConfigError, parse_timespan
from devhost.invocation import Invoker
from devhost.ncrontab import CronSchedule
from devhost.singleton import QueueLock

log = logging.getLogger("devhost.timer")

PAST_DUE_TOLERANCE = timedelta(seconds=1)
LOCK_RETRY_SECONDS = 30.0


class Schedule(Protocol):
    def next_after(self, moment: datetime) -> datetime: ...


@dataclass(frozen=True)
class IntervalSchedule:
    """A TimeSpan schedule such as "00:05:00": every interval, counted from the last occurrence."""

    interval: timedelta

    def next_after(self, moment: datetime) -> datetime:
        return moment + self.interval


def parse_schedule(expression: str) -> Schedule:
    text = expression.strip()
    if ":" in text:
        try:
            seconds = parse_timespan(text, "schedule")
        except HostConfigError:
            raise ValueError(f"schedule {expression!r} is neither NCRONTAB nor a TimeSpan") from None
        if seconds <= 0:
            raise ValueError(f"schedule {expression!r} must be a positive interval")
        return IntervalSchedule(timedelta(seconds=seconds))
    return CronSchedule.parse(text)


def schedule_timezone() -> tzinfo:
    name = os.environ.get("WEBSITE_TIME_ZONE", "").strip()
    if not name:
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("WEBSITE_TIME_ZONE=%r is not an IANA time zone name; using UTC", name)
        return timezone.utc


class TimerTrigger:
    def __init__(self, spec: FunctionSpec, invoker: Invoker, lock: QueueLock | None = None) -> None:
        self.spec = spec
        self.expression = str(spec.trigger.get("schedule", ""))
        self.schedule = parse_schedule(self.expression)
        self.run_on_startup = str(spec.trigger.get("runOnStartup", False)).lower() == "true"
        self._invoker = invoker
        self._lock = lock
        self._tz = schedule_timezone()
        self._stop = threading.Event()
        # Set by stop() and by losing the lock: either ends the current schedule loop.
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"devhost-timer-{spec.name}", daemon=True)

    def lock_lost(self) -> None:
        self._interrupt.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._interrupt.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._lock is not None:
            self._lock.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before acquiring, never after: a stop() or lost lock from here on is seen.
            self._interrupt.clear()
            if self._stop.is_set():
                break
            if self._lock is not None:
                try:
                    acquired = self._lock.try_acquire()
                except Exception as exc:
                    log.warning("Timer '%s': cannot reach the lock store: %s", self.spec.name, exc)
                    acquired = False
                if not acquired:
                    self._stop.wait(LOCK_RETRY_SECONDS)
                    continue
                log.info("Timer '%s': singleton lock acquired; this process runs it", self.spec.name)
            self._schedule_loop()

    def _now(self) -> datetime:
        return datetime.now(self._tz)

    def _schedule_loop(self) -> None:
        last = self._now()
        if self.run_on_startup and not self._interrupt.is_set():
            self._fire(last, past_due=False)
        while not self._interrupt.is_set():
            due = self.schedule.next_after(last)
            wait = (due - self._now()).total_seconds()
            if wait > 0 and self._interrupt.wait(wait):
                return
            now = self._now()
            past_due = now - due > PAST_DUE_TOLERANCE
            self._fire(due, past_due=past_due)
            # After a late run, schedule from now: missed occurrences are not replayed one by one.
            last = now if past_due else due

    def _fire(self, scheduled: datetime, *, past_due: bool) -> None:
        next_due = self.schedule.next_after(max(scheduled, self._now()))
        request = TimerRequest(
            past_due=past_due,
            schedule_status={"Last": scheduled.isoformat(), "Next": next_due.isoformat(),
                             "LastUpdated": self._now().isoformat()},
            schedule={"AdjustForDST": True},
        )
        try:
            self._invoker.invoke(self.spec, request, reason=f"Timer fired at {self._now().isoformat()}")
        except Exception:
            pass  # already logged by the invoker; a timer keeps its schedule after failures
