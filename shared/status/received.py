"""Received markers (fast intake, shared/intake/envelope.py): one status row per post, written
before its 202, so that a request accepted but not yet admitted by the queue door reads as
`received`, never as unknown. One row per post, not per request: a 1000-event post costs one write.

A marker is needed only while its post's envelopes may still be admitted: once admitted, a request
reads from its request row. The upkeep timer sweeps markers (`sweep`) only when the intake queue
holds no message at all (shared/operations/received_sweep.py), so every envelope sent before then
has been admitted or dead-lettered, and only markers older than KEPT_SECONDS, so that the marker of
a post still being answered when the queue was seen empty (its envelope not yet sent) is kept.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from itertools import islice
from typing import Any, Callable

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceModifiedError

from shared.errors import StatusStoreUnavailable
from shared.models import RequestStatus
from shared.status.rows import DUE_GRACE_SECONDS, moment
from shared.status.table import StatusTable, read_row

RECEIVED = "received"
NOT_YET_ADMITTED = ("accepted, but the intake queue function has not admitted it yet: it is admitted when the "
                    "function app's hosts run again; a message the host gives up on is dead-lettered with the "
                    "reason")
# Far longer than the HTTP door can take from writing a marker to answering the post 202: an HTTP
# function has 230 s to answer (https://learn.microsoft.com/azure/azure-functions/functions-scale#timeout),
# and a post's requestIds are given out only in that answer, after its envelopes are on the queue.
KEPT_SECONDS = 3600.0
SWEEP_BATCH = 1000  # markers deleted per run at most: the timer run stays short, the next one goes on
# Every marker's PartitionKey, and no other row's (request ids and group keys are hex), lies in
# [FIRST_KEY, AFTER_KEYS): the sweep reads that range, not the whole table.
FIRST_KEY, AFTER_KEYS = "post-", "post."


def request_secret(key: str, index: int) -> str:
    """48 bits of HMAC-SHA256 over the request's index under its post's key (shared/intake/envelope.py
    request_id): guessing a requestId of someone else's request takes 2**48 tries."""
    return hmac.new(bytes.fromhex(key), index.to_bytes(4, "big"), hashlib.sha256).hexdigest()[:12]


def _key(post_id: str) -> str:
    return FIRST_KEY + post_id


class ReceivedMarks:
    def __init__(self, table: StatusTable, clock: Callable[[], float] = time.time):
        self.table = table
        self.clock = clock

    def mark(self, post_id: str, key: str, requests: list[tuple[int, str]]) -> None:
        """The post's key and the (calls, priority) of each of its requests, by index. Raises
        StatusStoreUnavailable."""
        try:
            self.table.upsert_entity({"PartitionKey": _key(post_id), "RowKey": RECEIVED, "receivedAt": self.clock(),
                                      "key": key, "requests": json.dumps(requests, separators=(",", ":"))})
        except AzureError as exc:
            raise StatusStoreUnavailable(f"received marker not written: {type(exc).__name__}") from None

    def status(self, request_id: str, post_id: str, index: int, secret: str) -> RequestStatus | None:
        """The request's status while its post is received and not yet admitted; None for a request
        the post does not have, or a secret its key does not give."""
        row = read_row(self.table, _key(post_id), RECEIVED)
        requests = json.loads(row.get("requests") or "[]") if row else []
        if index >= len(requests) or not hmac.compare_digest(request_secret(str(row.get("key")), index), secret):
            return None
        calls, priority = requests[index]
        received_at = float(row["receivedAt"])
        late = self.clock() - received_at > DUE_GRACE_SECONDS
        return RequestStatus(requestId=request_id, priority=priority, state=RECEIVED, receivedAt=moment(received_at),
                             callCount=calls, calls=[], note=NOT_YET_ADMITTED if late else None)

    def sweep(self) -> int:
        """Delete markers older than KEPT_SECONDS (at most SWEEP_BATCH); returns how many went. Only
        safe while the intake queue is empty (see the module's docstring). Each delete is
        conditional on the marker's etag: one written again meanwhile is kept."""
        old = self.table.query_entities(
            "PartitionKey ge @first and PartitionKey lt @after and receivedAt lt @before",
            parameters={"first": FIRST_KEY, "after": AFTER_KEYS, "before": self.clock() - KEPT_SECONDS},
            select=["PartitionKey", "RowKey"])
        return sum(self._delete_unchanged(row) for row in islice(old, SWEEP_BATCH))

    def _delete_unchanged(self, row: Any) -> int:
        try:
            self.table.delete_entity(row["PartitionKey"], row["RowKey"], etag=row.metadata["etag"],
                                     match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            return 0
        return 1
