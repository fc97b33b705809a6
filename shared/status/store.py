"""Request status and coalescing, kept in one Azure Table (STATUS_TABLE).

Three kinds of rows:
- request row   PK = requestId, RK = "request" (and "request.1", ... for very large requests): the
  request's calls, each with its group key and booked slot. Written once the slots are booked.
- call row      PK = group key, RK = "<requestId>:<callIndex>": state, since, attempts, why it
  waits and until when, the decoded result when done, and `servedBy` when another call serves it.
- open row      PK = group key, RK = "open": the call of this group that has not gone out yet, and
  the calls that joined it.

The group key is a hash of (servicePrincipalId, jobId, ruleId, subject), so every row of equal
calls shares one partition: joining a waiting call, closing the group as its call goes out, and
finishing the call with everything it served are each one atomic entity-group transaction. A crash
between two steps leaves rows that the next step, or the redelivered work message, completes; a
call row whose worker stopped reads as stalled, never as silently stuck (see `describe`).

Cost per call when nothing coalesces: one transaction at intake (open row + call row), one per
request for the request row, one as the call goes out (close + "calling"), one with the result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterable

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import (
    TableClient,
    TableTransactionError,
    UpdateMode,
)

from shared.errors import StatusStoreUnavailable
from shared.models import CallStatus, Follower, RequestStatus, ResultMessage, WorkItem
from shared.results.sinks import fit_for_queue
from shared.settings import Settings
from shared.tables import table_service

log = logging.getLogger(__name__)

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


def _merge(row: dict[str, Any], etag: str | None = None) -> tuple:
    options: dict[str, Any] = {"mode": UpdateMode.MERGE}
    if etag is not None:
        options.update(etag=etag, match_condition=MatchConditions.IfNotModified)
    return ("update" if etag is not None else "upsert", row, options)


def _delete_if_unchanged(key: str, row_key: str, etag: str) -> tuple:
    return ("delete", {"PartitionKey": key, "RowKey": row_key},
            {"etag": etag, "match_condition": MatchConditions.IfNotModified})


def _followers_of(row: dict[str, Any] | None) -> list[Follower]:
    return [Follower.model_validate(f) for f in json.loads((row or {}).get("followers") or "[]")]


def _result_text(result: ResultMessage) -> str:
    return fit_for_queue(result, limit=RESULT_CHARS)


class StatusStore:
    def __init__(self, table: TableClient, coalesce: bool, max_join_age: float, clock=time.time):
        self.table = table
        self.coalesce = coalesce
        self.max_join_age = max_join_age
        self.clock = clock
        self._created = False
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings) -> "StatusStore":
        # A follower may join a leader for as long as the leader may legitimately wait.
        return cls(table_service(settings).get_table_client(settings.status_table), settings.coalesce_requests,
                   settings.max_expected_wait_hours * 3600)

    def _ensure_table(self) -> None:
        with self._lock:
            if not self._created:
                try:
                    self.table.create_table()
                except ResourceExistsError:
                    pass
                self._created = True

    # -- intake ---------------------------------------------------------------------------------

    def admit(self, items: list[WorkItem]) -> list[WorkItem]:
        """Record every call as queued. A call equal to one that has not gone out yet joins it and
        gets no slot of its own. Returns the calls that need slots. Raises StatusStoreUnavailable; the
        caller then withdraws the lot with forget()."""
        try:
            self._ensure_table()
            # Each call is its own partition: a bulk post is admitted in parallel.
            with ThreadPoolExecutor(max_workers=min(PARALLEL, len(items)) or 1) as pool:
                joined = list(pool.map(self._admit_one, items))
            return [item for item, did_join in zip(items, joined) if not did_join]
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def _admit_one(self, item: WorkItem) -> bool:
        """True when the call joined an equal waiting call."""
        item.coalesceKey = key = group_key(item)
        row = self._call_row(item, QUEUED)
        if not self.coalesce:
            self.table.upsert_entity(row)
            return False
        for _ in range(ATTEMPTS):
            opened = {"PartitionKey": key, "RowKey": OPEN, "leader": item.call_id, "openedAt": self.clock(),
                      "followers": "[]"}
            try:
                answers = self.table.submit_transaction([("create", opened), ("create", row)])
                item.openEtag = answers[0]["etag"]
                return False
            except TableTransactionError as exc:
                if exc.status_code != 409:
                    raise
            try:
                group = self.table.get_entity(key, OPEN)
            except ResourceNotFoundError:
                continue  # its call went out meanwhile: lead a new group
            followers = _followers_of(group)
            if self._leader_lost(group, key):
                if self._take_over(item, group, row, followers):
                    return False
                continue
            joined = [*followers, Follower(**item.model_dump(include=set(Follower.model_fields)))]
            # Followers travel in the group row and in the leader's work message, both size-limited;
            # a callbackUrl, CloudEvent or subject name makes one larger than its ids alone.
            if len(joined) > MAX_FOLLOWERS or len(_followers_text(joined)) > FOLLOWERS_CHARS:
                break
            try:
                self.table.submit_transaction([
                    _merge({"PartitionKey": key, "RowKey": OPEN, "followers": _followers_text(joined)},
                           etag=group.metadata["etag"]),
                    ("create", {**row, "servedBy": group["leader"]}),
                ])
                return True
            except TableTransactionError as exc:
                if exc.status_code not in (404, 409, 412):
                    raise
        self.table.upsert_entity(row)  # a call of its own, outside any group
        return False

    def _leader_lost(self, group: dict[str, Any], key: str) -> bool:
        """A leader whose host died at intake (after admit, before its work was queued) never goes
        out: once its slot is well past and it is still queued, nobody may wait on it."""
        age = self.clock() - float(group.get("openedAt") or 0)
        if age > self.max_join_age:
            return True
        if age < DUE_GRACE_SECONDS:
            return False  # its intake may still be under way
        slot = self._booked_slot(group["leader"], key)
        if slot is None:
            return True  # its request was never recorded: the intake failed
        leader = self._row(key, group["leader"]) or {}
        return leader.get("state", QUEUED) == QUEUED and self.clock() - slot > DUE_GRACE_SECONDS

    def _take_over(self, item: WorkItem, group: dict[str, Any], row: dict[str, Any],
                   followers: list[Follower]) -> bool:
        """Lead a group whose leader was lost, keeping the requests that joined it."""
        key = item.coalesceKey
        try:
            self.table.submit_transaction([
                _merge({"PartitionKey": key, "RowKey": OPEN, "leader": item.call_id, "openedAt": self.clock()},
                       etag=group.metadata["etag"]),
                ("create", row),
                *[_merge({"PartitionKey": key, "RowKey": f.call_id, "servedBy": item.call_id}) for f in followers]])
        except TableTransactionError as exc:
            if exc.status_code not in (404, 409, 412):
                raise
            return False
        log.warning("call %s leads the group of lost call %s (%d waiting)", item.call_id, group["leader"],
                    len(followers))
        item.openEtag = ""  # the group it leads has followers to read when it goes out
        return True

    def record_requests(self, requests: Iterable[tuple[str, str | None, str, list[WorkItem]]]) -> None:
        """One row per request (requestId, correlationId, priority, calls), once slots are booked.
        Best effort: the calls are queued by now, and a missing row only makes the status API answer 404."""
        rows = []
        for request_id, correlation_id, priority, items in requests:
            calls = [[item.callIndex, item.coalesceKey, item.notBefore] for item in items]
            rows += [{"PartitionKey": request_id, "RowKey": REQUEST if part == 0 else f"{REQUEST}.{part}",
                      "correlationId": correlation_id, "priority": priority, "callCount": len(calls),
                      "receivedAt": items[0].receivedAt.isoformat() if items else None,
                      "calls": json.dumps(calls[start:start + CALLS_PER_REQUEST_ROW])}
                     for part, start in enumerate(range(0, len(calls), CALLS_PER_REQUEST_ROW))]
        try:
            with ThreadPoolExecutor(max_workers=min(PARALLEL, len(rows)) or 1) as pool:
                list(pool.map(self.table.upsert_entity, rows))
        except AzureError as exc:
            log.warning("request status not recorded: %s", type(exc).__name__)

    def forget(self, items: list[WorkItem]) -> list[WorkItem]:
        """Undo admit() for calls that will not be queued after all (their post was refused).
        Returns the calls that must still be made: when accepted requests joined a withdrawn call
        meanwhile, the first of them inherits the group and needs a slot of its own."""
        heirs = []
        for item in items:
            if item.coalesceKey is None:
                continue
            try:
                heir = self._withdraw(item)
            except AzureError:
                log.warning("could not withdraw the status of refused call %s", item.call_id)
                continue
            if heir is not None:
                heirs.append(heir)
        return heirs

    def _withdraw(self, item: WorkItem) -> WorkItem | None:
        key, mine = item.coalesceKey, ("delete", {"PartitionKey": item.coalesceKey, "RowKey": item.call_id})
        for _ in range(ATTEMPTS):
            try:
                group = self.table.get_entity(key, OPEN)
            except ResourceNotFoundError:
                group = None
            followers = _followers_of(group)
            if group is None or (group["leader"] != item.call_id and item.call_id not in {f.call_id for f in followers}):
                try:
                    self.table.delete_entity(key, item.call_id)  # a call outside any group
                except ResourceNotFoundError:
                    pass
                return None
            if group["leader"] != item.call_id:  # it joined another call: leave that group
                stay = [f for f in followers if f.call_id != item.call_id]
                operations = [_merge({"PartitionKey": key, "RowKey": OPEN, "followers": _followers_text(stay)},
                                     etag=group.metadata["etag"]), mine]
                heir = None
            elif not followers:
                operations = [_delete_if_unchanged(key, OPEN, group.metadata["etag"]), mine]
                heir = None
            else:  # accepted requests wait on this call: the first of them leads the group now
                first, rest = followers[0], followers[1:]
                operations = [
                    _merge({"PartitionKey": key, "RowKey": OPEN, "leader": first.call_id,
                            "followers": _followers_text(rest)}, etag=group.metadata["etag"]),
                    _merge({"PartitionKey": key, "RowKey": first.call_id, "servedBy": ""}),
                    *[_merge({"PartitionKey": key, "RowKey": f.call_id, "servedBy": first.call_id}) for f in rest],
                    mine]
                # openEtag "": it leads a group that already has followers, to be read when it goes out.
                heir = item.model_copy(update={**first.model_dump(), "notBefore": None, "followers": [],
                                               "openEtag": ""})
            try:
                self.table.submit_transaction(operations)
            except TableTransactionError as exc:
                if exc.status_code not in (404, 409, 412):
                    raise
                continue  # the group changed meanwhile: look again
            return heir
        log.warning("could not withdraw refused call %s: its group kept changing", item.call_id)
        return None

    # -- the worker -----------------------------------------------------------------------------

    def start_call(self, item: WorkItem) -> WorkItem:
        """Close the call's group (nobody joins a call that is going out) and mark it calling.
        Returns the item carrying its followers. Raises StatusStoreUnavailable."""
        if item.coalesceKey is None:  # a work item from before status tracking
            return item
        try:
            self._ensure_table()
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
            self.table.submit_transaction([_merge({**calling, "followers": _followers_text(item.followers)})])
            return item
        # Most groups have nobody waiting on them: the etag of the open row as created still matches.
        if item.openEtag and self._close_group(key, item.openEtag, calling, []):
            return item.model_copy(update={"openEtag": None, "followers": []})
        try:
            group = self.table.get_entity(key, OPEN)
        except ResourceNotFoundError:
            group = None
        if group is None or group.get("leader") != item.call_id:
            # Either this message ran before and closed its group then (its followers are on its
            # row), or it was taken for lost and another call leads its group now (none are).
            followers = _followers_of(self._row(key, item.call_id))
            self.table.submit_transaction([_merge({**calling, "followers": _followers_text(followers)})])
            return item.model_copy(update={"openEtag": None, "followers": followers})
        followers = _followers_of(group)
        if not self._close_group(key, group.metadata["etag"], calling, followers):
            return None  # another call joined meanwhile: read the group again
        return item.model_copy(update={"openEtag": None, "followers": followers})

    def _close_group(self, key: str, etag: str, calling: dict[str, Any], followers: list[Follower]) -> bool:
        """Delete the open row if it is as read, and stamp the call calling with its followers."""
        try:
            self.table.submit_transaction([_delete_if_unchanged(key, OPEN, etag),
                                           _merge({**calling, "followers": _followers_text(followers)})])
        except TableTransactionError as exc:
            if exc.status_code not in (404, 412):
                raise
            return False
        return True

    def booked(self, items: list[WorkItem]) -> None:
        """The slots of calls booked after their request row was written (a group handed over)."""
        for item in items:
            self._best_effort(f"slot of {item.call_id}", [_merge({
                "PartitionKey": item.coalesceKey, "RowKey": item.call_id, "eta": item.notBefore})])

    def waiting(self, item: WorkItem, reason: str) -> None:
        """The call was put back to wait for a later slot (capacity, throttling, an outage)."""
        if item.coalesceKey is None:
            return
        self._best_effort(f"waiting {item.call_id}", [_merge({
            "PartitionKey": item.coalesceKey, "RowKey": item.call_id, "state": WAITING, "since": self.clock(),
            "attempts": item.attempts, "reason": reason, "eta": item.notBefore})])

    def finish(self, item: WorkItem, results: list[ResultMessage]) -> None:
        """The final state and result of a call and of every call it served, atomically."""
        if item.coalesceKey is None:
            return
        rows = [_merge({"PartitionKey": item.coalesceKey, "RowKey": result.resultId,
                        "state": state_of(result.result), "since": self.clock(), "attempts": result.attempts,
                        "reason": result.errorCode or "", "result": _result_text(result)})
                for result in results]
        self._best_effort(f"result of {item.call_id}", rows)

    def _best_effort(self, what: str, operations: list) -> None:
        # The result queue is the record of truth; a status write must never cost a Graph call.
        try:
            self._ensure_table()
            self.table.submit_transaction(operations)
        except AzureError as exc:
            log.warning("status not recorded (%s): %s", what, type(exc).__name__)

    # -- the status API -------------------------------------------------------------------------

    def read(self, request_id: str, spacing: float, call_timeout: float) -> RequestStatus | None:
        try:
            self._ensure_table()
            heads = sorted(self.table.query_entities("PartitionKey eq @id", parameters={"id": request_id}),
                           key=lambda row: (len(row["RowKey"]), row["RowKey"]))
            if not heads:
                return None
            calls = [call for head in heads for call in json.loads(head.get("calls") or "[]")]
            now = self.clock()
            return RequestStatus(
                requestId=request_id, correlationId=heads[0].get("correlationId"),
                priority=heads[0].get("priority") or "normal", receivedAt=heads[0].get("receivedAt"),
                callCount=heads[0].get("callCount") or len(calls), state=QUEUED,
                calls=[self._call_status(request_id, index, key, eta, now, spacing, call_timeout)
                       for index, key, eta in calls],
            ).summarised(now)
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def _call_status(self, request_id: str, index: int, key: str, eta: float | None, now: float,
                     spacing: float, call_timeout: float) -> CallStatus:
        row = self._row(key, f"{request_id}:{index}") or {"state": QUEUED}
        state, since = row.get("state") or QUEUED, row.get("since")
        served_by = row.get("servedBy") or None
        eta = row.get("eta") or eta
        if served_by and state not in FINAL:
            # A follower is exactly as far along as the call that serves it.
            leader = self._row(key, served_by) or {}
            state, since = leader.get("state") or QUEUED, leader.get("since") or since
            eta = leader.get("eta") or self._booked_slot(served_by, key)
        result = json.loads(row["result"]) if row.get("result") else None
        status = CallStatus(callIndex=index, state=state, attempts=int(row.get("attempts") or 0),
                            since=_moment(since), reason=row.get("reason") or None, servedBy=served_by,
                            callsSaved=(result or {}).get("callsSaved") or 0, result=result)
        if state in (QUEUED, WAITING) and eta:
            status.eta = _moment(eta)
            status.etaSeconds = round(max(0.0, eta - now), 1)
            status.callsAhead = max(0, math.floor((eta - now) / spacing))
            if now - eta > DUE_GRACE_SECONDS:
                status.stalled = True
                status.note = ("due since its slot but not yet taken by a worker: it runs when the function "
                               "app's hosts are running again")
        elif state == CALLING and since and now - float(since) > call_timeout + DUE_GRACE_SECONDS:
            status.stalled = True
            status.note = ("no answer recorded: the worker stopped during the call; the call is retried when "
                           "its work message returns to the queue")
        return status

    def _row(self, key: str, row_key: str) -> dict[str, Any] | None:
        try:
            return dict(self.table.get_entity(key, row_key))
        except ResourceNotFoundError:
            return None

    def _booked_slot(self, call_id: str, key: str) -> float | None:
        request_id, _, index = call_id.rpartition(":")
        head = self._row(request_id, REQUEST) or {}
        for call_index, call_key, eta in json.loads(head.get("calls") or "[]"):
            if str(call_index) == index and call_key == key:
                return eta
        return None

    def _call_row(self, item: WorkItem, state: str) -> dict[str, Any]:
        return {"PartitionKey": item.coalesceKey, "RowKey": item.call_id, "state": state, "since": self.clock(),
                "attempts": item.attempts, "requestId": item.requestId, "callIndex": item.callIndex}


def _followers_text(followers: list[Follower]) -> str:
    return json.dumps([f.model_dump(mode="json") for f in followers])


def _moment(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(float(epoch), timezone.utc) if epoch else None

