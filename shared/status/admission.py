"""Intake's side of coalescing: admit calls, say when their work is durably queued, withdraw them.

A group's open row is created "pending" with its leader's call: nobody may join a call whose work
message may not exist. Intake marks it queued once the leader's work message is on the queue (sent
by the SDK, delayed to its slot); a call due now goes out through the host's output binding, which
intake cannot observe, so its group never becomes joinable (its worker closes it within seconds).
Hence a follower only ever waits on a call that is durably queued, and a leader withdrawn before
that has nobody waiting on it.

Request ids derived from the queue message (shared/intake/validation.py) make a redelivered message
admit the same calls: each finds its own row and is recognised (`_again`) instead of joining its
first attempt as a follower. A pending group whose intake died is taken over by the next equal call
once it is DUE_GRACE_SECONDS old.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from azure.core.exceptions import AzureError
from azure.data.tables import TableEntity, TableTransactionError

from shared.models import Follower, WorkItem
from shared.status.rows import (
    ATTEMPTS,
    DUE_GRACE_SECONDS,
    MAX_FOLLOWERS,
    OPEN,
    PARALLEL,
    QUEUED,
    call_row,
    followers_of,
    followers_text,
    group_key,
)
from shared.status.table import StatusTable, delete_if_unchanged, merge, read_row

log = logging.getLogger(__name__)

LEAD, JOINED, ALREADY_QUEUED = "lead", "joined", "already-queued"
CONFLICTS = (404, 409, 412)


@dataclass(frozen=True)
class Admission:
    """A call as admitted: `item` carries its group key (and, leading a group, its open row's etag);
    `role` says whether it needs a slot and a work message (LEAD), waits on an equal queued call
    (JOINED), or was queued by an earlier delivery of the same message (ALREADY_QUEUED, its slot in
    `item.notBefore` when known)."""

    item: WorkItem
    role: str


class Admitter:
    def __init__(self, table: StatusTable, coalesce: bool, max_join_age: float, clock: Callable[[], float] = time.time):
        self.table = table
        self.coalesce = coalesce
        self.max_join_age = max_join_age
        self.clock = clock

    def admit(self, items: list[WorkItem]) -> list[Admission]:
        """One admission per call, in order. Raises AzureError; the caller then withdraws the lot."""
        # Each call is its own partition: a bulk post is admitted in parallel.
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(items)) or 1) as pool:
            return list(pool.map(self._admit_one, items))

    def _admit_one(self, item: WorkItem) -> Admission:
        item = item.model_copy(update={"coalesceKey": group_key(item), "openEtag": None})
        key, row = item.coalesceKey, call_row(item, QUEUED, self.clock())
        if not self.coalesce:
            self.table.upsert_entity(row)
            return Admission(item, LEAD)
        for _ in range(ATTEMPTS):
            opened = {"PartitionKey": key, "RowKey": OPEN, "leader": item.call_id, "openedAt": self.clock(),
                      "followers": "[]", "queued": False}
            try:
                answers = self.table.submit_transaction([("create", opened), ("create", row)])
                return Admission(item.model_copy(update={"openEtag": answers[0]["etag"]}), LEAD)
            except TableTransactionError as exc:
                if exc.status_code != 409:
                    raise
            group, mine = read_row(self.table, key, OPEN), read_row(self.table, key, item.call_id)
            if mine is not None:
                return self._again(item, group, mine)
            if group is None:
                continue  # its call went out meanwhile: lead a new group
            if not self._may_join(group) and not self._abandoned(group):
                break
            admitted = self._join(item, group, row) if self._may_join(group) else self._take_over(item, group, row)
            if admitted is not None:
                return admitted
        self.table.upsert_entity(row)  # a call of its own, outside any group
        return Admission(item, LEAD)

    def _again(self, item: WorkItem, group: TableEntity | None, mine: TableEntity) -> Admission:
        """The same call admitted before: a redelivered intake message."""
        if mine.get("servedBy"):
            return Admission(item, ALREADY_QUEUED)  # it joined a queued call, which serves it
        leading = group is not None and group.get("leader") == item.call_id
        if mine.get("state", QUEUED) != QUEUED or (leading and group.get("queued")):
            return Admission(item.model_copy(update={"notBefore": mine.get("eta")}), ALREADY_QUEUED)
        # Its work may or may not have been sent: queue it (again). A second copy costs at most a
        # second Graph call under the same resultId (at-least-once), never a lost request.
        return Admission(item.model_copy(update={"openEtag": group.metadata["etag"] if leading else None}), LEAD)

    def _may_join(self, group: TableEntity) -> bool:
        # Rows written before the "queued" marker existed were joinable as soon as they were open.
        return (bool(group.get("queued", True)) and self.clock() - float(group.get("openedAt") or 0) <= self.max_join_age
                and len(followers_of(group)) < MAX_FOLLOWERS)

    def _abandoned(self, group: TableEntity) -> bool:
        """A pending group this old lost its intake (a host died, a client gave up): nobody waits on it."""
        return not group.get("queued", True) and self.clock() - float(group.get("openedAt") or 0) > DUE_GRACE_SECONDS

    def _join(self, item: WorkItem, group: TableEntity, row: dict[str, Any]) -> Admission | None:
        joined = [*followers_of(group), Follower(**item.model_dump(include=set(Follower.model_fields)))]
        answers = self._submit([
            merge({"PartitionKey": item.coalesceKey, "RowKey": OPEN, "followers": followers_text(joined)},
                  etag=group.metadata["etag"]),
            ("create", {**row, "servedBy": group["leader"]})])
        return None if answers is None else Admission(item, JOINED)

    def _take_over(self, item: WorkItem, group: TableEntity, row: dict[str, Any]) -> Admission | None:
        answers = self._submit([
            merge({"PartitionKey": item.coalesceKey, "RowKey": OPEN, "leader": item.call_id,
                   "openedAt": self.clock(), "queued": False}, etag=group.metadata["etag"]),
            ("create", row)])
        if answers is None:
            return None
        log.warning("call %s leads the abandoned group of call %s", item.call_id, group["leader"])
        return Admission(item.model_copy(update={"openEtag": answers[0]["etag"]}), LEAD)

    def _submit(self, operations: list) -> list | None:
        """The transaction's answers, or None when the group changed meanwhile."""
        try:
            return self.table.submit_transaction(operations)
        except TableTransactionError as exc:
            if exc.status_code not in CONFLICTS:
                raise
            return None

    def mark_queued(self, items: list[WorkItem]) -> None:
        """The work messages of these leaders are on the queue: their rows get the slot (the status
        then knows they will run) and their groups become joinable. Best effort: a group left pending
        only means later equal calls make calls of their own."""
        for item in items:
            operations = [merge({"PartitionKey": item.coalesceKey, "RowKey": item.call_id, "eta": item.notBefore})]
            if item.openEtag:
                operations.append(merge({"PartitionKey": item.coalesceKey, "RowKey": OPEN, "queued": True},
                                        etag=item.openEtag))
            try:
                self.table.submit_transaction(operations)
            except TableTransactionError as exc:
                if exc.status_code not in CONFLICTS:  # taken over, or already closed by its worker
                    log.warning("group of %s not opened to joins: %s", item.call_id, type(exc).__name__)
            except AzureError as exc:
                log.warning("group of %s not opened to joins: %s", item.call_id, type(exc).__name__)

    def forget(self, admissions: list[Admission]) -> None:
        """Undo admit() for calls that will not be queued after all (their post was refused or
        failed). A call an earlier delivery queued stays: its work message is on the queue."""
        for admission in admissions:
            if admission.role == ALREADY_QUEUED:
                continue
            try:
                self._withdraw(admission.item)
            except AzureError:
                log.warning("could not withdraw the status of refused call %s", admission.item.call_id)

    def _withdraw(self, item: WorkItem) -> None:
        for _ in range(ATTEMPTS):
            operations = self._withdrawal(item, read_row(self.table, item.coalesceKey, OPEN))
            if not operations:
                return
            try:
                self.table.submit_transaction(operations)
                return
            except TableTransactionError as exc:
                if exc.status_code not in CONFLICTS:
                    raise
                if exc.status_code == 404 and len(operations) == 1:
                    return  # nothing left to withdraw
        log.warning("could not withdraw refused call %s: its group kept changing", item.call_id)

    @staticmethod
    def _withdrawal(item: WorkItem, group: TableEntity | None) -> list:
        """The transaction that withdraws the call from the group as read; empty when it must stay."""
        key, mine = item.coalesceKey, ("delete", {"PartitionKey": item.coalesceKey, "RowKey": item.call_id})
        followers = followers_of(group)
        if group is not None and group.get("leader") == item.call_id:
            if group.get("queued", True):
                return []  # another delivery of the same message queued it meanwhile: it stays
            return [delete_if_unchanged(key, OPEN, group.metadata["etag"]), mine]
        if group is not None and item.call_id in {f.call_id for f in followers}:
            stay = [f for f in followers if f.call_id != item.call_id]
            return [merge({"PartitionKey": key, "RowKey": OPEN, "followers": followers_text(stay)},
                          etag=group.metadata["etag"]), mine]
        return [mine]  # a call outside any group
