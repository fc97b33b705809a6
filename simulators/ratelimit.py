"""Sliding-window rate limiting as Graph applies it to provisionOnDemand (5 requests per 10 s).

Arrivals are timestamped with time.monotonic() when the request arrives. An arrival at time `t` is
admitted when no window of length `window` containing it would hold more than `calls` counted
arrivals (windows are half-open: two arrivals exactly `window` apart never share one). Throttled
arrivals are counted too unless `count_throttled` is off (Graph keeps counting while you are
throttled).
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Hashable, Iterable

PRUNE_MARGIN = 60.0  # keep entries this long past the window, for arrivals processed late


def max_in_window(times: Iterable[float], window: float) -> int:
    """The largest number of `times` inside any half-open window [s, s + window)."""
    ts = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(ts):
        if j < i:
            j = i
        while j < len(ts) and ts[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def parse_rate(text: str) -> tuple[int, float]:
    """"5/10" -> (5, 10.0): at most 5 calls per 10 seconds."""
    calls, _, window = str(text).partition("/")
    return int(calls), float(window or 10)


class SlidingWindowLimiter:
    def __init__(self, calls: int | None = 5, window: float = 10.0, count_throttled: bool = True) -> None:
        self.calls = calls
        self.window = float(window)
        self.count_throttled = count_throttled
        self._entries: dict[Hashable, list[float]] = {}
        self._lock = threading.Lock()

    def configure(self, *, calls: int | None = None, window: float | None = None,
                  count_throttled: bool | None = None) -> None:
        with self._lock:
            if calls is not None:
                self.calls = int(calls)
            if window is not None:
                self.window = float(window)
            if count_throttled is not None:
                self.count_throttled = bool(count_throttled)

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    def _prune(self, entries: list[float], now: float) -> None:
        cut = bisect.bisect_right(entries, now - self.window - PRUNE_MARGIN)
        if cut:
            del entries[:cut]

    def record(self, key: Hashable, t: float) -> None:
        """Count an arrival without checking it (scripted answers are arrivals too)."""
        with self._lock:
            entries = self._entries.setdefault(key, [])
            self._prune(entries, time.monotonic())
            bisect.insort(entries, t)

    def _would_exceed(self, entries: list[float], t: float) -> bool:
        """Would inserting `t` put more than `calls` arrivals in some window containing `t`?"""
        combined = list(entries)
        bisect.insort(combined, t)
        i = bisect.bisect_left(combined, t)
        while i < len(combined) and combined[i] < t + self.window:
            s = combined[i]
            inside = bisect.bisect_right(combined, s) - bisect.bisect_right(combined, s - self.window)
            if inside > self.calls:  # type: ignore[operator]
                return True
            i += 1
        return False

    def admit(self, key: Hashable, t: float, now: float | None = None) -> tuple[bool, int | None, bool]:
        """(admitted, retry_after_seconds or None, counted) for an arrival at monotonic time `t`."""
        with self._lock:
            now = time.monotonic() if now is None else now
            entries = self._entries.setdefault(key, [])
            self._prune(entries, now)
            if not self.calls or self.calls <= 0:  # unlimited
                bisect.insort(entries, t)
                return True, None, True
            throttled = self._would_exceed(entries, t)
            counted = (not throttled) or self.count_throttled
            if counted:
                bisect.insort(entries, t)
            if not throttled:
                return True, None, True
            lo = bisect.bisect_right(entries, t - self.window)
            hi = bisect.bisect_right(entries, t)
            recent = entries[lo:hi]  # counted arrivals in (t - window, t], this one included if counted
            n = len(recent)
            frees_at = recent[n - self.calls] + self.window if n >= self.calls else t + self.window
            # Whole seconds, strictly after the slot frees (an exact integer would land on the boundary).
            return False, max(1, math.floor(frees_at - now + 1e-6) + 1), counted
