"""Whether to make a call again because its subject was skipped as not in scope yet.

An assignment to the app takes a few minutes to apply, so a subject posted right after it was
assigned comes back Skipped (NotEffectivelyEntitled). With OUT_OF_SCOPE_RETRY_MINUTES set, the
worker puts such a call back on the work queue, hidden for that long, at most
MAX_OUT_OF_SCOPE_RETRIES times; each retry is one more provisionOnDemand call, counted in the
result's `attempts` and `outOfScopeRetries`.
"""
from __future__ import annotations

from shared.models import Outcome, WorkItem
from shared.settings import Settings

MAX_OUT_OF_SCOPE_RETRIES = 2


def decide_out_of_scope_retry(outcome: Outcome, item: WorkItem, settings: Settings) -> float | None:
    """Seconds until the call is made again, or None to report the outcome as it is."""
    minutes = settings.out_of_scope_retry_minutes
    if minutes <= 0 or outcome.verdict != "outOfScope" or item.outOfScopeRetries >= MAX_OUT_OF_SCOPE_RETRIES:
        return None
    return minutes * 60.0
