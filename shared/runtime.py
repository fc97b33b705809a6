"""The long-lived clients of one process, built once on first use and shared by every function."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache

from .credentials import app_credential
from .graph_client import GraphClient
from .lease import QueueTokenStore, RateGate, pool_queue_name
from .log_analytics import result_sinks
from .models import WorkItem
from .schedule import Schedule
from .settings import Settings, get_settings
from .sinks import ResultSink
from .storage import Queues, service_client


@dataclass
class Runtime:
    settings: Settings
    queues: Queues
    graph: GraphClient
    sinks: list[ResultSink]
    _gates: dict[str, RateGate] = field(default_factory=dict)
    _schedules: dict[str, Schedule] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pool_name(self, item: WorkItem | None = None) -> str:
        s = self.settings
        return pool_queue_name(s.lease_queue, s.rate_limit_scope.value,
                               item.servicePrincipalId if item else "", item.jobId if item else "")

    def gate_for(self, item: WorkItem | None = None) -> RateGate:
        s = self.settings
        name = self.pool_name(item)
        with self._lock:
            gate = self._gates.get(name)
            if gate is None:
                gate = RateGate(QueueTokenStore(self.queues.get(name)), s.rate_limit_calls,
                                s.rate_limit_window_seconds, s.rate_limit_margin_seconds, s.graph_timeout_seconds)
                self._gates[name] = gate
            return gate

    def schedule_for(self, item: WorkItem | None = None) -> Schedule:
        name = self.pool_name(item) + "-schedule"
        with self._lock:
            schedule = self._schedules.get(name)
            if schedule is None:
                schedule = Schedule(QueueTokenStore(self.queues.get(name)), self.settings.slot_spacing)
                self._schedules[name] = schedule
            return schedule


def build_runtime(settings: Settings) -> Runtime:
    queues = Queues(service_client(settings))
    graph = GraphClient(settings, app_credential(settings.azure_client_id))
    return Runtime(settings=settings, queues=queues, graph=graph, sinks=result_sinks(settings, queues))


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return build_runtime(get_settings())
