"""The status store as the rest of the app sees it: one object over the status table that
creates the table on first use and hands each question to the module that answers it."""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from azure.core.exceptions import AzureError

from shared.errors import StatusStoreUnavailable
from shared.models import RequestStatus, ResultMessage, WorkItem
from shared.settings import Settings
from shared.status.admission import Admission, Admitter
from shared.status.progress import CallProgress
from shared.status.read_model import StatusReader
from shared.status.received import ReceivedMarks
from shared.status.table import StatusTable, connect
from shared.tables import create_table


class StatusStore:
    def __init__(self, table: StatusTable, coalesce: bool, max_join_age: float,
                 clock: Callable[[], float] = time.time):
        self.table = table
        self.admission = Admitter(table, coalesce, max_join_age, clock)
        self.progress = CallProgress(table, clock)
        self.reader = StatusReader(table, clock)
        self.marks = ReceivedMarks(table, clock)
        self._created = False
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, settings: Settings) -> "StatusStore":
        # A follower may join a leader for as long as the leader may legitimately wait.
        return cls(connect(settings), settings.coalesce_requests, settings.max_expected_wait_hours * 3600)

    def _ready(self) -> None:
        with self._lock:
            if not self._created:
                create_table(self.table)
                self._created = True

    def _ready_or_unavailable(self) -> None:
        try:
            self._ready()
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def admit(self, items: list[WorkItem]) -> list[Admission]:
        """Record every call as queued, or recognise it from an earlier delivery; an equal call
        whose work is queued is joined instead of booking a slot. Raises StatusStoreUnavailable;
        the caller then withdraws the lot with forget()."""
        try:
            self._ready()
            return self.admission.admit(items)
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def mark_queued(self, items: list[WorkItem]) -> None:
        self.admission.mark_queued(items)

    def forget(self, admissions: list[Admission]) -> None:
        self.admission.forget(admissions)

    def record_requests(self, requests: Iterable[tuple[str, str | None, str, list[WorkItem]]]) -> None:
        self.reader.record_requests(requests)

    def start_call(self, item: WorkItem) -> WorkItem:
        self._ready_or_unavailable()
        return self.progress.start_call(item)

    def waiting(self, item: WorkItem, reason: str) -> None:
        self.progress.waiting(item, reason)

    def finish(self, item: WorkItem, results: list[ResultMessage]) -> None:
        self.progress.finish(item, results)

    def read(self, request_id: str, spacing: float, call_timeout: float, page: int = 1) -> RequestStatus | None:
        self._ready_or_unavailable()
        return self.reader.read(request_id, spacing, call_timeout, page)

    def mark_received(self, post_id: str, key: str, requests: list[tuple[int, str]]) -> None:
        """Before a fast-intake post is answered 202: its requests read as received until admitted."""
        self._ready_or_unavailable()
        self.marks.mark(post_id, key, requests)

    def sweep_received(self) -> int:
        """Delete old received markers; only while the intake queue is empty (shared/status/received.py)."""
        self._ready_or_unavailable()
        try:
            return self.marks.sweep()
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None

    def received(self, request_id: str, post_id: str, index: int, secret: str) -> RequestStatus | None:
        try:
            return self.marks.status(request_id, post_id, index, secret)
        except AzureError as exc:
            raise StatusStoreUnavailable(str(exc)) from None
