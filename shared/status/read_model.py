"""The answer of GET /api/provision/{requestId}: request rows, and each call's row (or its leader's)."""
from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from azure.core.exceptions import AzureError

from shared.errors import StatusStoreUnavailable
from shared.models import CallStatus, RequestStatus, WorkItem
from shared.status.rows import (
    CALLING,
    CALLS_PER_REQUEST_ROW,
    DUE_GRACE_SECONDS,
    FINAL,
    PARALLEL,
    QUEUED,
    REQUEST,
    WAITING,
    moment,
)
from shared.status.table import StatusTable, read_row

log = logging.getLogger(__name__)

# A 1000-call request would otherwise cost a GET 1000+ table reads (issue 13 N3).
CALLS_PER_PAGE = 100

STALLED_QUEUED = ("due since its slot but not yet taken by a worker: it runs when the function app's hosts are "
                  "running again")
STALLED_UNCONFIRMED = ("due since its slot but not taken by a worker, and its intake did not record it as queued: it "
                       "may never run. A queue message is delivered again and then dead-lettered with the reason; "
                       "a POST that was not answered 202 must be sent again")
STALLED_CALLING = ("no answer recorded: the worker stopped during the call; the call is retried when its work "
                   "message returns to the queue")


class StatusReader:
    def __init__(self, table: StatusTable, clock: Callable[[], float] = time.time):
        self.table = table
        self.clock = clock

    def record_requests(self, requests: Iterable[tuple[str, str | None, str, list[WorkItem]]]) -> None:
        """One row per request (requestId, correlationId, priority, calls), once slots are booked.
        Raises StatusStoreUnavailable: the calls are queued by now, so only the caller knows whether
        to try again (the queue door redelivers) or to answer without (the HTTP door)."""
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
            raise StatusStoreUnavailable(f"request status not recorded: {type(exc).__name__}") from None

    def read(self, request_id: str, spacing: float, call_timeout: float, page: int = 1) -> RequestStatus | None:
        """The request and the calls on `page` (CALLS_PER_PAGE each): a read costs one query of the
        request rows and at most CALLS_PER_PAGE call rows (and their leaders'), whatever the
        request's size. A page past the last one reads no call rows and lists none."""
        try:
            heads = sorted(self.table.query_entities("PartitionKey eq @id", parameters={"id": request_id}),
                           key=lambda row: (len(row["RowKey"]), row["RowKey"]))
            if not heads:
                return None
            calls = [call for head in heads for call in json.loads(head.get("calls") or "[]")]
            start = (page - 1) * CALLS_PER_PAGE
            now = self.clock()
            with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
                shown = list(pool.map(lambda call: self._call_status(request_id, *call, now, spacing, call_timeout),
                                      calls[start:start + CALLS_PER_PAGE]))
            pages = max(1, math.ceil(len(calls) / CALLS_PER_PAGE))
            return RequestStatus(
                requestId=request_id, correlationId=heads[0].get("correlationId"),
                priority=heads[0].get("priority") or "normal", receivedAt=heads[0].get("receivedAt"),
                callCount=heads[0].get("callCount") or len(calls), state=QUEUED, calls=shown,
                page=page, pageCount=pages, nextPage=page + 1 if page < pages else None,
            ).summarised(now)
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def _call_status(self, request_id: str, index: int, key: str, eta: float | None, now: float,
                     spacing: float, call_timeout: float) -> CallStatus:
        row = dict(read_row(self.table, key, f"{request_id}:{index}") or {"state": QUEUED})
        served_by = row.get("servedBy") or None
        state, since, eta = self._progress(row, key, served_by, eta)
        result = json.loads(row["result"]) if row.get("result") else None
        status = CallStatus(callIndex=index, state=state, attempts=int(row.get("attempts") or 0),
                            since=moment(since), reason=row.get("reason") or None, servedBy=served_by,
                            callsSaved=(result or {}).get("callsSaved") or 0, result=result)
        if state in (QUEUED, WAITING) and eta:
            return status.model_copy(update=_eta_fields(eta, now, spacing, _known_queued(row, state, served_by)))
        if state == CALLING and _overdue(since, now, call_timeout):
            return status.model_copy(update={"stalled": True, "note": STALLED_CALLING})
        return status

    def _progress(self, row: dict[str, Any], key: str, served_by: str | None,
                  eta: float | None) -> tuple[str, Any, float | None]:
        """(state, since, eta) of a call: a follower is exactly as far along as the call that serves it."""
        state, since, eta = row.get("state") or QUEUED, row.get("since"), row.get("eta") or eta
        if not served_by or state in FINAL:
            return state, since, eta
        leader = read_row(self.table, key, served_by) or {}
        return (leader.get("state") or QUEUED, leader.get("since") or since,
                leader.get("eta") or self._booked_slot(served_by, key))

    def _booked_slot(self, call_id: str, key: str) -> float | None:
        request_id, _, index = call_id.rpartition(":")
        head = read_row(self.table, request_id, REQUEST) or {}
        for call_index, call_key, eta in json.loads(head.get("calls") or "[]"):
            if str(call_index) == index and call_key == key:
                return eta
        return None


def _known_queued(row: dict[str, Any], state: str, served_by: str | None) -> bool:
    # Intake writes the slot on the call's row once its work is on the queue, and a worker when it
    # puts the call back; followers only join calls that are queued.
    return state == WAITING or bool(served_by) or bool(row.get("eta"))


def _overdue(since: Any, now: float, call_timeout: float) -> bool:
    return bool(since) and now - float(since) > call_timeout + DUE_GRACE_SECONDS


def _eta_fields(eta: float, now: float, spacing: float, confirmed: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"eta": moment(eta), "etaSeconds": round(max(0.0, eta - now), 1),
                              "callsAhead": max(0, math.floor((eta - now) / spacing))}
    if now - eta > DUE_GRACE_SECONDS:
        fields.update(stalled=True, note=STALLED_QUEUED if confirmed else STALLED_UNCONFIRMED)
    return fields
