"""The worker's side of coalescing: close a call's group as it goes out, record waits and results."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from azure.core.exceptions import AzureError
from azure.data.tables import TableTransactionError

from shared.errors import StatusStoreUnavailable
from shared.models import ResultMessage, WorkItem
from shared.status.rows import (
    ATTEMPTS,
    CALLING,
    OPEN,
    WAITING,
    followers_of,
    followers_text,
    result_text,
    state_of,
)
from shared.status.table import StatusTable, delete_if_unchanged, merge, read_row

log = logging.getLogger(__name__)


class CallProgress:
    def __init__(self, table: StatusTable, clock: Callable[[], float] = time.time):
        self.table = table
        self.clock = clock

    def start_call(self, item: WorkItem) -> WorkItem:
        """Close the call's group (nobody joins a call that is going out) and mark it calling.
        Returns the item carrying its followers. Raises StatusStoreUnavailable."""
        if item.coalesceKey is None:  # a work item from before status tracking
            return item
        try:
            for _ in range(ATTEMPTS):
                closed = self._close(item)
                if closed is not None:
                    return closed
            raise StatusStoreUnavailable(f"group of {item.call_id} kept changing")
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def _close(self, item: WorkItem) -> WorkItem | None:
        key = item.coalesceKey
        calling = {"PartitionKey": key, "RowKey": item.call_id, "state": CALLING, "since": self.clock(),
                   "attempts": item.attempts, "reason": ""}
        if item.openEtag is None:
            self.table.submit_transaction([merge({**calling, "followers": followers_text(item.followers)})])
            return item
        # Most groups have nobody waiting on them: the etag of the open row as created still matches.
        if item.openEtag and self._close_group(key, item.openEtag, calling, []):
            return item.model_copy(update={"openEtag": None, "followers": []})
        group = read_row(self.table, key, OPEN)
        if group is None or group.get("leader") != item.call_id:
            # Either this message ran before and closed its group then (its followers are on its
            # row), or its pending group was taken over as abandoned (it has none).
            followers = followers_of(read_row(self.table, key, item.call_id))
            self.table.submit_transaction([merge({**calling, "followers": followers_text(followers)})])
            return item.model_copy(update={"openEtag": None, "followers": followers})
        followers = followers_of(group)
        if not self._close_group(key, group.metadata["etag"], calling, followers):
            return None  # another call joined meanwhile: read the group again
        return item.model_copy(update={"openEtag": None, "followers": followers})

    def _close_group(self, key: str, etag: str, calling: dict[str, Any], followers: list) -> bool:
        """Delete the open row if it is as read, and stamp the call calling with its followers."""
        try:
            self.table.submit_transaction([delete_if_unchanged(key, OPEN, etag),
                                           merge({**calling, "followers": followers_text(followers)})])
        except TableTransactionError as exc:
            if exc.status_code not in (404, 412):
                raise
            return False
        return True

    def waiting(self, item: WorkItem, reason: str) -> None:
        """The call was put back to wait for a later slot (capacity, throttling, an outage)."""
        if item.coalesceKey is None:
            return
        self._best_effort(f"waiting {item.call_id}", [merge({
            "PartitionKey": item.coalesceKey, "RowKey": item.call_id, "state": WAITING, "since": self.clock(),
            "attempts": item.attempts, "reason": reason, "eta": item.notBefore})])

    def finish(self, item: WorkItem, results: list[ResultMessage]) -> None:
        """The final state and result of a call and of every call it served, atomically."""
        if item.coalesceKey is None:
            return
        rows = [merge({"PartitionKey": item.coalesceKey, "RowKey": result.resultId,
                       "state": state_of(result.result), "since": self.clock(), "attempts": result.attempts,
                       "reason": result.errorCode or "", "result": result_text(result)})
                for result in results]
        self._best_effort(f"result of {item.call_id}", rows)

    def _best_effort(self, what: str, operations: list) -> None:
        # The result queue is the record of truth; a status write must never cost a Graph call.
        try:
            self.table.submit_transaction(operations)
        except AzureError as exc:
            log.warning("status not recorded (%s): %s", what, type(exc).__name__)
