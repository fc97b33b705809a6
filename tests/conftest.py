"""Shared fixtures: real Azurite, the loopback simulators, and the app running in devhost.

Windows are shrunk (5 calls per 2 s) so that the suite stays fast; the logic is the same."""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Callable

import httpx
import pytest
from azure.storage.queue import QueueClient

from devhost.azurite import start_azurite
from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP, start_devhost
from simulators import start_simulators

FAST = {
    "RATE_LIMIT_CALLS": "5",
    "RATE_LIMIT_WINDOW_SECONDS": "2",
    "RATE_LIMIT_MARGIN_SECONDS": "0.25",
    "RETRY_BASE_SECONDS": "1",
    "RETRY_MAX_SECONDS": "4",
    "GRAPH_TIMEOUT_SECONDS": "5",
    "MAX_ATTEMPTS": "4",
}


@pytest.fixture(scope="session")
def azurite():
    instance = start_azurite()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def sims():
    running = start_simulators(rate_calls=5, rate_window=2.0)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def app_env(azurite, sims) -> dict[str, str]:
    return {"AzureWebJobsStorage": azurite.connection_string, **sims.env(), **FAST,
            "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP, "DEFAULT_JOB_ID": EXAMPLE_JOB,
            "DEFAULT_RULE_ID": EXAMPLE_RULE}


class QueueCollector:
    """Drains a queue in the background and keeps every message, so tests can wait for theirs."""

    def __init__(self, connection: str, name: str):
        self.queue = QueueClient.from_connection_string(connection, name)
        try:
            self.queue.create_queue()
        except Exception:
            pass
        self.messages: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            got = False
            for m in self.queue.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=30):
                got = True
                try:
                    body = json.loads(m.content)
                except ValueError:
                    body = {"_unparsed": m.content}
                with self._lock:
                    self.messages.append(body)
                self.queue.delete_message(m)
            if not got:
                self._stop.wait(0.1)

    def wait_for(self, predicate: Callable[[dict], bool], count: int = 1, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [m for m in self.messages if predicate(m)]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"expected {count} message(s), got {len(found)} of {len(self.messages)}"
                return found
            time.sleep(0.1)

    def matching(self, predicate: Callable[[dict], bool]) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="session")
def results(azurite) -> QueueCollector:
    collector = QueueCollector(azurite.connection_string, "provision-results")
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def deadletters(azurite) -> QueueCollector:
    collector = QueueCollector(azurite.connection_string, "provision-deadletter")
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def devhost(app_env, tmp_path_factory):
    host = start_devhost(app_env, log_dir=tmp_path_factory.mktemp("devhost"))
    yield host
    host.stop()


class IsolatedHost:
    """One devhost with queues, simulators, host id (and any extra settings) of its own, so that
    what a module configures in the Graph simulator cannot disturb another module's checks."""

    def __init__(self, azurite, log_dir, prefix: str, **settings: str):
        suffix = uuid.uuid4().hex[:10]
        self.queues = {"INTAKE_QUEUE": f"{prefix}-in-{suffix}", "WORK_QUEUE": f"{prefix}-work-{suffix}",
                       "RESULTS_QUEUE": f"{prefix}-res-{suffix}", "DEADLETTER_QUEUE": f"{prefix}-dead-{suffix}",
                       "LEASE_QUEUE": f"{prefix}-lease-{suffix}"}
        self.connection = azurite.connection_string
        self.sims = start_simulators(rate_calls=5, rate_window=2.0)
        self.env = {"AzureWebJobsStorage": azurite.connection_string, **self.sims.env(), **FAST, **self.queues,
                    "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP, "DEFAULT_JOB_ID": EXAMPLE_JOB,
                    "AzureFunctionsWebHost__hostid": f"{prefix}-{suffix}",
                    "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "00:00:02", **settings}
        self.host = start_devhost(self.env, log_dir=log_dir)
        self.results = QueueCollector(azurite.connection_string, self.queues["RESULTS_QUEUE"])
        self.deadletters = QueueCollector(azurite.connection_string, self.queues["DEADLETTER_QUEUE"])

    def queue(self, setting: str) -> QueueClient:
        return QueueClient.from_connection_string(self.connection, self.queues[setting])

    def post(self, body, **params) -> httpx.Response:
        return httpx.post(f"{self.host.url}/api/provision", json=body, params=params, timeout=30)

    def result(self, request_id: str, timeout: float = 60) -> dict:
        [result] = self.results.wait_for(lambda m: m.get("requestId") == request_id, timeout=timeout)
        return result

    def result_of(self, body, timeout: float = 60) -> dict:
        """The result of one event posted alone."""
        response = self.post(body)
        assert response.status_code == 202, response.text
        [accepted] = response.json()["requests"]
        return self.result(accepted["requestId"], timeout)

    def stop(self) -> None:
        self.results.stop()
        self.deadletters.stop()
        self.host.stop()
        self.sims.stop()


def module_host(name: str, make: Callable[..., IsolatedHost]):
    """A module-scoped fixture `name`: one host of its own from `make(azurite, log_dir)`, stopped after
    the module's tests."""
    @pytest.fixture(scope="module", name=name)
    def host(azurite, tmp_path_factory):
        started = make(azurite, tmp_path_factory.mktemp(name))
        yield started
        started.stop()
    return host


def admitted(base_url: str, request_id: str, timeout: float = 20) -> dict:
    """The request's status once it is admitted. With FAST_INTAKE it reads `received` until the queue
    door has admitted it (and booked its slots); the synchronous door admits before its 202."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{base_url}/api/provision/{request_id}", timeout=30)
        assert response.status_code == 200, response.text
        if response.json()["state"] != "received":
            return response.json()
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


def wait_until(condition: Callable[[], Any], timeout: float = 60) -> Any:
    """What `condition` returns once it is truthy, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
