"""The long-lived clients of one process, built once on first use and shared by every function."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Protocol, TypeVar

import httpx

from shared.graph.client import GraphClient
from shared.graph.credentials import app_credential
from shared.intake import envelope
from shared.intake.group_commit import GroupCommit
from shared.intake.idempotency import AnswerBook
from shared.models import WorkItem
from shared.queues import Queues, service_client
from shared.ratelimit.slot_timeline import Schedule
from shared.ratelimit.token_gate import QueueTokenStore, RateGate, pool_queue_name
from shared.results.callbacks import CallbackLedger, http_client
from shared.results.sinks import ResultSink, result_sinks
from shared.settings import Settings, get_settings
from shared.status.store import StatusStore

T = TypeVar("T")
# The calls the queue door admits in one round at most (an envelope with more goes alone). Small
# rounds still share one booking among several envelopes, and keep each round's burst of table and
# queue requests short: on a process that also answers POSTs, rounds of up to 1000 calls held HTTP
# answers behind them (p95 102-104 ms at 8 clients; 8 calls: 91-96 ms; BENCHMARKS.md "Intake speed").
ADMISSION_ROUND_CALLS = 8


class Runtime(Protocol):
    """What the functions need from the composition root. The app builds an AppRuntime; tests
    build their own in process (tests/fakes.py) with in-memory stores and a simulated clock."""

    settings: Settings
    queues: Queues
    graph: GraphClient
    sinks: list[ResultSink]
    status: StatusStore
    callbacks: CallbackLedger
    callback_http: httpx.Client
    answers: AnswerBook
    timeline_peeks: dict[str, tuple[float, list[str]]]  # FAST_INTAKE's per-process read of each timeline
    intake_commits: GroupCommit  # FAST_INTAKE's POSTs of this process that share a post
    admission_commits: GroupCommit  # FAST_INTAKE's envelopes of this process admitted together

    def pool_name(self, item: WorkItem | None = None) -> str: ...
    def schedule_queue(self, item: WorkItem | None = None) -> str: ...
    def gate_for(self, item: WorkItem | None = None) -> RateGate: ...
    def schedule_for(self, item: WorkItem | None = None) -> Schedule: ...


@dataclass
class AppRuntime:
    settings: Settings
    queues: Queues
    graph: GraphClient
    sinks: list[ResultSink]
    status: StatusStore
    callbacks: CallbackLedger
    callback_http: httpx.Client
    answers: AnswerBook  # Idempotency-Keys and seen webhook signatures
    # The HTTP door's last peek at each timeline: (time.monotonic(), contents) (shared/intake/backlog.py).
    timeline_peeks: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    intake_commits: GroupCommit = field(default_factory=lambda: GroupCommit(envelope.ROOM))
    admission_commits: GroupCommit = field(default_factory=lambda: GroupCommit(ADMISSION_ROUND_CALLS))
    _gates: dict[str, RateGate] = field(default_factory=dict)
    _schedules: dict[str, Schedule] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pool_name(self, item: WorkItem | None = None) -> str:
        s = self.settings
        return pool_queue_name(s.lease_queue, s.rate_limit_scope.value,
                               item.servicePrincipalId if item else "", item.jobId if item else "")

    def gate_for(self, item: WorkItem | None = None) -> RateGate:
        s = self.settings
        return self._per_pool(self._gates, self.pool_name(item), lambda store: RateGate(
            store, s.rate_limit_calls, s.rate_limit_window_seconds, s.rate_limit_margin_seconds,
            s.graph_timeout_seconds))

    def schedule_queue(self, item: WorkItem | None = None) -> str:
        return self.pool_name(item) + "-schedule"

    def schedule_for(self, item: WorkItem | None = None) -> Schedule:
        return self._per_pool(self._schedules, self.schedule_queue(item),
                              lambda store: Schedule(store, self.settings.slot_spacing,
                                                     high_share=self.settings.high_priority_share))

    def _per_pool(self, cache: dict, queue_name: str, build: Callable[[QueueTokenStore], T]) -> T:
        # One object per pool and process: the gate caches the epoch, the queue is created once.
        with self._lock:
            if queue_name not in cache:
                cache[queue_name] = build(QueueTokenStore(self.queues.service.get_queue_client(queue_name)))
            return cache[queue_name]


def build_runtime(settings: Settings) -> AppRuntime:
    queues = Queues(service_client(settings))
    graph = GraphClient(settings, app_credential(settings.azure_client_id))
    return AppRuntime(settings=settings, queues=queues, graph=graph, sinks=result_sinks(settings, queues),
                      status=StatusStore.connect(settings), callbacks=CallbackLedger.connect(settings),
                      callback_http=http_client(settings), answers=AnswerBook.connect(settings))


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return build_runtime(get_settings())
