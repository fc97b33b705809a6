"""Intake's side of coalescing: admit calls, say when their work is durably queued, withdraw them.

A group's open row is created with its leader's call, and nobody may join a call whose work message
may not exist: only once intake has sent the leader's work message (delayed to its slot, by the SDK)
does it write the slot on the leader's call row (`eta`), and only a group whose leader's row has
one is joined. A call due now goes out through the host's output binding, which intake cannot
observe, so its group is never joined (its worker closes it within seconds). Hence a follower only
ever waits on a call that is durably queued, and a leader withdrawn before that has nobody waiting
on it. The marker is on the call row, not the open row, so the open row's etag as created still
closes the group in one transaction when nobody joined.

Request ids derived from the queue message (shared/intake/validation.py) make a redelivered message
admit the same calls: each finds its own row and is recognised (`_again`) instead of joining its
first attempt as a follower. A group whose leader was never queued is taken over by the next equal
call once it is DUE_GRACE_SECONDS old (its intake died).
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
    FOLLOWERS_CHARS,
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
                      "followers": "[]"}
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
            queued = "eta" in (read_row(self.table, key, group["leader"]) or {})
            if not self._may_join(group, queued, item) and not self._abandoned(group, queued):
                break
            admitted = self._join(item, group, row) if queued else self._take_over(item, group, row)
            if admitted is not None:
                return admitted
        self.table.upsert_entity(row)  # a call of its own, outside any group
        return Admission(item, LEAD)

    def _again(self, item: WorkItem, group: TableEntity | None, mine: TableEntity) -> Admission:
        """The same call admitted before: a redelivered intake message."""
        if mine.get("servedBy"):
            return Admission(item, ALREADY_QUEUED)  # it joined a queued call, which serves it
        if mine.get("state", QUEUED) != QUEUED or "eta" in mine:
            return Admission(item.model_copy(update={"notBefore": mine.get("eta")}), ALREADY_QUEUED)
        leading = group is not None and group.get("leader") == item.call_id
        # Its work may or may not have been sent: queue it (again). A second copy costs at most a
        # second Graph call under the same resultId (at-least-once), never a lost request.
        return Admission(item.model_copy(update={"openEtag": group.metadata["etag"] if leading else None}), LEAD)

    def _may_join(self, group: TableEntity, queued: bool, item: WorkItem) -> bool:
        if not queued or self.clock() - float(group.get("openedAt") or 0) > self.max_join_age:
            return False
        # Followers travel in the group row and in the leader's work message, both size-limited;
        # a callbackUrl, CloudEvent or subject name makes one larger than its ids alone.
        joined = [*followers_of(group), Follower(**item.model_dump(include=set(Follower.model_fields)))]
        return len(joined) <= MAX_FOLLOWERS and len(followers_text(joined)) <= FOLLOWERS_CHARS

    def _abandoned(self, group: TableEntity, queued: bool) -> bool:
        """A group whose leader was never queued, this old, lost its intake (a host died, a client
        gave up): nobody waits on it."""
        return not queued and self.clock() - float(group.get("openedAt") or 0) > DUE_GRACE_SECONDS

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
                   "openedAt": self.clock()}, etag=group.metadata["etag"]),
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
        """The work messages of these leaders are on the queue: their rows get their slots, which
        makes their groups joinable and tells the status that they will run. Best effort: a call
        left unmarked only means later equal calls make calls of their own."""
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(items)) or 1) as pool:
            list(pool.map(self._mark_queued, items))

    def _mark_queued(self, item: WorkItem) -> None:
        try:
            self.table.upsert_entity({"PartitionKey": item.coalesceKey, "RowKey": item.call_id, "eta": item.notBefore})
        except AzureError as exc:
            log.warning("call %s not recorded as queued: %s", item.call_id, type(exc).__name__)

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
            mine = read_row(self.table, item.coalesceKey, item.call_id)
            if mine is not None and "eta" in mine:
                return  # another delivery of the same message queued it meanwhile: it stays
            operations = self._withdrawal(item, read_row(self.table, item.coalesceKey, OPEN))
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
        """The transaction that withdraws the call from the group as read."""
        key, mine = item.coalesceKey, ("delete", {"PartitionKey": item.coalesceKey, "RowKey": item.call_id})
        followers = followers_of(group)
        if group is not None and group.get("leader") == item.call_id:
            # Never queued, so nobody joined it (except in groups opened before joins waited for that).
            return [delete_if_unchanged(key, OPEN, group.metadata["etag"]), mine]
        if group is not None and item.call_id in {f.call_id for f in followers}:
            stay = [f for f in followers if f.call_id != item.call_id]
            return [merge({"PartitionKey": key, "RowKey": OPEN, "followers": followers_text(stay)},
                          etag=group.metadata["etag"]), mine]
        return [mine]  # a call outside any group
