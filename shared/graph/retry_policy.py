"""When to try again: Retry-After parsing and backoff with jitter."""
from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

# The longest Retry-After honoured. Graph's throttling guidance says to wait the Retry-After it
# gives (https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling) and its
# values are seconds to minutes; a larger one is clamped here so that no value can hide a call
# beyond what a queue message allows (7 days, https://learn.microsoft.com/rest/api/storageservices/put-message)
# or make the slot timeline refuse every new request for hours. A throttled call that comes back
# too early is simply throttled again.
MAX_RETRY_AFTER_SECONDS = 3600.0


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date, clamped to
    [0, MAX_RETRY_AFTER_SECONDS]; None if absent, unreadable or not a finite number."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until(text, now or datetime.now(timezone.utc))
    if seconds is None or not math.isfinite(seconds):  # "inf", "nan", "1e999"
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


def _seconds_until(http_date: str, now: datetime) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - now).total_seconds()


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so retries spread out
    but never come back sooner than half the nominal delay."""
    nominal = min(cap, base * (2 ** min(64, max(0, attempt - 1))))
    return nominal / 2 + (rng or random).uniform(0, nominal / 2)
