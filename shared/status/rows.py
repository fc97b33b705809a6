"""The rows of the status table and the names and limits they share (see shared/status/__init__.py)."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from shared.models import Follower, ResultMessage, WorkItem
from shared.results.sinks import fit_for_queue

QUEUED, WAITING, CALLING = "queued", "waiting", "calling"
SUCCEEDED, SKIPPED, FAILED, DEAD_LETTERED = "succeeded", "skipped", "failed", "dead-lettered"
FINAL = (SUCCEEDED, SKIPPED, FAILED, DEAD_LETTERED)

OPEN, REQUEST = "open", "request"
# A leader and its followers finish in one transaction: at most 100 rows and 4 MiB, and a result
# takes up to 60 KiB (RESULT_CHARS in UTF-16).
MAX_FOLLOWERS = 30
FOLLOWERS_CHARS = 24_000  # under a string property's 32 K characters, and well within a 64 KiB work message
CALLS_PER_REQUEST_ROW = 400   # a string property holds 32 K characters
RESULT_CHARS = 30_000
ATTEMPTS = 5
DUE_GRACE_SECONDS = 120.0     # a queued call this far past its slot reads as stalled
PARALLEL = 8                  # table requests in flight while admitting a bulk post


def group_key(item: WorkItem) -> str:
    """Equal calls (same service principal, job, rule and subject, links included) share a key.
    Priority is part of it: a high-priority request never waits behind a normal call it joined."""
    subject = item.subject
    identity = [item.servicePrincipalId.lower(), item.jobId, item.ruleId, subject.objectTypeName,
                subject.objectId, subject.members or [], item.priority]
    if subject.manager or subject.owners:  # appended only when present: keys of calls without them stay as they were
        identity += [subject.manager, subject.owners or []]
    return hashlib.sha256(json.dumps(identity).encode("utf-8")).hexdigest()[:40]


def state_of(result: str) -> str:
    # "Error" is our own: the call was given up on and dead-lettered (shared/worker.py).
    return {"Success": SUCCEEDED, "Warning": SUCCEEDED, "Skipped": SKIPPED, "Error": DEAD_LETTERED}.get(result, FAILED)


def followers_of(row: dict[str, Any] | None) -> list[Follower]:
    return [Follower.model_validate(f) for f in json.loads((row or {}).get("followers") or "[]")]


def followers_text(followers: list[Follower]) -> str:
    return json.dumps([f.model_dump(mode="json") for f in followers])


def result_text(result: ResultMessage) -> str:
    return fit_for_queue(result, limit=RESULT_CHARS)


def call_row(item: WorkItem, state: str, now: float) -> dict[str, Any]:
    return {"PartitionKey": item.coalesceKey, "RowKey": item.call_id, "state": state, "since": now,
            "attempts": item.attempts, "requestId": item.requestId, "callIndex": item.callIndex}


def moment(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(float(epoch), timezone.utc) if epoch else None
