"""Fast intake (issue 13) through devhost, Azurite and the simulators: a GET right after the 202
answers (never 404), a host SIGKILLed right after its 202s loses nothing, and backpressure still
refuses with 503 and Retry-After once the booked backlog is too long."""
from __future__ import annotations

import signal
import time
import uuid

import httpx
import pytest

from scripts.local_stack import EXAMPLE_RULE, start_devhost
from tests.conftest import IsolatedHost


def user() -> str:
    return str(uuid.uuid4())


def events(count: int, tag: str) -> list[dict]:
    return [{"objectId": user(), "objectTypeName": "User", "correlationId": f"{tag}/{i}"} for i in range(count)]


@pytest.fixture
def fast(azurite, tmp_path):
    # 5 calls per 2 s: a slot every 0.4 s; 0.002 h = 7.2 s of backlog at most (18 slots).
    host = IsolatedHost(azurite, tmp_path, "fast", DEFAULT_RULE_ID=EXAMPLE_RULE, MAX_EXPECTED_WAIT_HOURS="0.002",
                        FAST_INTAKE="true", STATUS_TABLE=f"fast{uuid.uuid4().hex[:10]}",
                        # The killed host's envelope or work comes back after 6 s, not the host's 10 minutes.
                        DEVHOST_MESSAGE_LEASE_SECONDS="6")
    host.log_dir = tmp_path
    yield host
    host.stop()


def post(host: IsolatedHost, body) -> httpx.Response:
    return httpx.post(f"{host.host.url}/api/provision", json=body, timeout=30)


def state(host: IsolatedHost, request_id: str) -> str:
    response = httpx.get(f"{host.host.url}/api/provision/{request_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["state"]


def wait_state(host: IsolatedHost, request_id: str, states: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (found := state(host, request_id)) not in states and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_a_get_right_after_the_202_answers_and_a_sigkill_right_after_loses_nothing(fast):
    accepted = post(fast, events(10, "kill"))
    assert accepted.status_code == 202
    ids = [r["requestId"] for r in accepted.json()["requests"]]
    # Before the queue door can have admitted them: each reads received (or already further), never 404.
    assert {state(fast, rid) for rid in ids} <= {"received", "queued", "waiting", "calling", "succeeded", "skipped"}
    fast.host.stop(sig=signal.SIGKILL)
    fast.host = start_devhost(fast.env, log_dir=fast.log_dir)
    found = fast.results.wait_for(lambda m: m.get("requestId") in ids, timeout=60, count=len(ids))
    assert {m["requestId"] for m in found} == set(ids)
    assert {wait_state(fast, rid, {"succeeded", "skipped"}) for rid in ids} <= {"succeeded", "skipped"}


def test_backpressure_refuses_with_retry_after_once_the_booked_backlog_is_too_long(fast):
    first = post(fast, events(15, "a"))  # 15 slots: 5.6 s out, within 7.2 s
    assert first.status_code == 202
    last = first.json()["requests"][-1]["requestId"]
    assert wait_state(fast, last, {"queued", "calling", "succeeded", "skipped"}) != "received"
    # The door reuses its peek at the timeline for about a second, and sees a post's calls only once
    # the queue door booked them: posts in that time still pass (how many depends on how fast they
    # are answered), and the door refuses within a few seconds.
    began = time.monotonic()
    while (refused := post(fast, events(15, "b"))).status_code == 202 and time.monotonic() < began + 10:
        pass
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "BacklogTooLong", refused.text
    assert int(refused.headers["Retry-After"]) >= 1 and time.monotonic() - began <= 3
