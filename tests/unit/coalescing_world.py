"""A world for in-process tests of intake and coalescing: the status store on the in-memory table,
a durable work queue, workers that close groups and report one result per call served, and a
runtime for shared/handlers.py whose every step (table request, booking, send, output binding) can
be made the point where the host dies."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from azure.core.exceptions import ServiceRequestError

from shared.errors import StatusStoreUnavailable
from shared.models import ResultMessage, WorkItem, utcnow
from shared.ratelimit.slot_timeline import Booking
from shared.settings import Settings
from shared.status.rows import FINAL, OPEN, REQUEST, followers_of
from shared.status.store import StatusStore
from tests.fakes import Clock, MemoryTable


class HostCrash(BaseException):
    """The host process dies here: nothing after this step runs (BaseException: no handler catches it)."""


@dataclass
class Served:
    call_id: str
    served_by: str | None


@dataclass
class World:
    clock: Clock = field(default_factory=Clock)
    table: MemoryTable = field(default_factory=MemoryTable)
    queue: list[str] = field(default_factory=list)          # work messages: durable once appended
    served: list[Served] = field(default_factory=list)      # one per result emitted
    sends: Counter = field(default_factory=Counter)         # work messages sent per call
    dead_letters: list = field(default_factory=list)
    graph_calls: int = 0

    def __post_init__(self) -> None:
        self.clock.now = time.time()  # placement books on the wall clock
        self.store = StatusStore(self.table, coalesce=True, max_join_age=3600, clock=self.clock)

    def send(self, item: WorkItem) -> None:
        self.queue.append(item.model_dump_json(exclude_none=True))
        self.sends[item.call_id] += 1

    def work(self, index: int = 0) -> None:
        """One worker run of a work message: close its group, call, report everyone it served."""
        text = self.queue.pop(index % len(self.queue))
        try:
            going = self.store.start_call(WorkItem.model_validate_json(text))
        except StatusStoreUnavailable:
            self.queue.append(text)                          # deferred: it runs again later
            return
        self.graph_calls += 1
        served = [Served(going.call_id, None)] + [Served(f.call_id, going.call_id) for f in going.followers]
        self.served += served
        self.store.finish(going, [_result(going, s) for s in served])

    def drain(self) -> None:
        while self.queue:
            self.work()

    def results(self) -> Counter:
        return Counter(s.call_id for s in self.served)

    def stranded_followers(self) -> list[str]:
        """Followers waiting on a group whose leader has no work message on the queue."""
        queued = {WorkItem.model_validate_json(text).call_id for text in self.queue}
        return [f.call_id for (key, row_key), row in self.table.rows.items()
                if row_key == OPEN for f in followers_of(row) if row.get("leader") not in queued]

    def unfinished_requests(self) -> list[str]:
        """Requests whose status can be read and is not final: each would read queued for ever."""
        ids = [pk for pk, rk in self.table.rows if rk == REQUEST]
        return [rid for rid in ids if self.store.read(rid, 2.0, 30).state not in FINAL]


def _result(item: WorkItem, served: Served) -> ResultMessage:
    request_id, _, index = served.call_id.rpartition(":")
    return ResultMessage(resultId=served.call_id, requestId=request_id, servicePrincipalId=item.servicePrincipalId,
                         jobId=item.jobId, ruleId=item.ruleId, subject=item.subject, callIndex=int(index),
                         callCount=item.callCount, attempts=1, receivedAt=item.receivedAt, completedAt=utcnow(),
                         result="Success", servedBy=served.served_by)


class Steps:
    """Counts intake's steps; the `crash_at`-th kills the host, and from the `outage_at`-th on the
    table is unreachable for `outage_length` requests (None: never)."""

    def __init__(self, crash_at: int | None = None, outage_at: int | None = None, outage_length: int = 0):
        self.count = 0
        self.crash_at, self.outage_at, self.outage_length = crash_at, outage_at, outage_length
        self.refused = 0
        self.armed = False  # only intake's steps count: workers run undisturbed

    def __call__(self, what: str) -> None:
        if not self.armed:
            return
        self.count += 1
        if self.count == self.crash_at:
            raise HostCrash(what)
        if what.startswith("table") and self.outage_at is not None and self.count >= self.outage_at \
                and self.refused < self.outage_length:
            self.refused += 1
            raise ServiceRequestError("the status table cannot be reached")


class IntakeRuntime:
    """What shared/handlers.py uses of Runtime, over the world: bookings alternate between due now
    (written by the output binding) and a minute ahead (sent delayed by the SDK)."""

    def __init__(self, world: World, steps: Steps):
        self.world, self.steps = world, steps
        self.settings = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_RULE_ID=None)
        self.status, self.queues, self.graph = world.store, self, None
        world.table.fault = lambda operation: steps(f"table {operation}")
        self._bookings = 0

    def pool_name(self, item: WorkItem | None = None) -> str:
        return "pool"

    def schedule_for(self, item: WorkItem | None = None) -> "IntakeRuntime":
        return self

    def book(self, count: int, earliest: float | None = None, max_wait: float | None = None,
             lane: str = "normal") -> Booking:
        self.steps("book")
        slots = []
        for _ in range(count):
            self._bookings += 1
            slots.append(time.time() + (0 if self._bookings % 2 else 60))
        return Booking(slots=slots, horizon=slots[-1] if slots else time.time())

    def send_text(self, name: str, text: str, *, delay: int = 0) -> None:
        self.steps("send")
        self.world.send(WorkItem.model_validate_json(text))

    def send_json(self, name: str, body, *, delay: int = 0) -> None:
        self.world.dead_letters.append(body)
