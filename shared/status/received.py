"""Received markers (fast intake, shared/intake/envelope.py): one status row per post, written
before its 202, so that a request accepted but not yet admitted by the queue door reads as
`received`, never as unknown. One row per post, not per request: a 1000-event post costs one write.
"""
from __future__ import annotations

import json
import time
from typing import Callable

from azure.core.exceptions import AzureError

from shared.errors import StatusStoreUnavailable
from shared.models import RequestStatus
from shared.status.rows import DUE_GRACE_SECONDS, moment
from shared.status.table import StatusTable, read_row

RECEIVED = "received"
NOT_YET_ADMITTED = ("accepted, but the intake queue function has not admitted it yet: it is admitted when the "
                    "function app's hosts run again; a message the host gives up on is dead-lettered with the "
                    "reason")


def _key(post_id: str) -> str:
    return f"post-{post_id}"


class ReceivedMarks:
    def __init__(self, table: StatusTable, clock: Callable[[], float] = time.time):
        self.table = table
        self.clock = clock

    def mark(self, post_id: str, requests: list[tuple[int, str]]) -> None:
        """(calls, priority) of each request of the post, by index. Raises StatusStoreUnavailable."""
        try:
            self.table.upsert_entity({"PartitionKey": _key(post_id), "RowKey": RECEIVED, "receivedAt": self.clock(),
                                      "requests": json.dumps(requests, separators=(",", ":"))})
        except AzureError as exc:
            raise StatusStoreUnavailable(f"received marker not written: {type(exc).__name__}") from None

    def status(self, request_id: str, post_id: str, index: int) -> RequestStatus | None:
        row = read_row(self.table, _key(post_id), RECEIVED)
        requests = json.loads(row.get("requests") or "[]") if row else []
        if index >= len(requests):
            return None
        calls, priority = requests[index]
        received_at = float(row["receivedAt"])
        late = self.clock() - received_at > DUE_GRACE_SECONDS
        return RequestStatus(requestId=request_id, priority=priority, state=RECEIVED, receivedAt=moment(received_at),
                             callCount=calls, calls=[], note=NOT_YET_ADMITTED if late else None)
