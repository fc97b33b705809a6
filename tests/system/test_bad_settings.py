"""A bad setting through devhost: every route answers, /api/health and intake answer 503 naming the
setting (not its value), and messages on the intake and work queues are parked, not poisoned; once
the setting is fixed and the host restarted, the upkeep returns them and they are provisioned."""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP, start_devhost
from tests.conftest import IsolatedHost

BAD_VALUE = "five-ish"  # RATE_LIMIT_CALLS must be a whole number
USERS = ("9bb0f679-a883-4a6f-8260-35b491b8b8c8", "5c3f1ac3-fa32-4a4d-a0c5-3e8b0a2d1f7e")


def _count(queue: QueueClient) -> int:
    try:
        return int(queue.get_queue_properties().approximate_message_count or 0)
    except ResourceNotFoundError:
        return 0


def _wait(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def broken(azurite, tmp_path_factory):
    host = IsolatedHost(azurite, tmp_path_factory.mktemp("bad-settings"), "bad", RATE_LIMIT_CALLS=BAD_VALUE,
                        DEFAULT_RULE_ID=EXAMPLE_RULE)
    yield host
    host.stop()


def test_bad_setting_answers_503_and_loses_no_message(broken, tmp_path_factory):
    health = httpx.get(f"{broken.host.url}/api/health", timeout=10)
    assert health.status_code == 503
    error = health.json()["error"]
    assert error["code"] == "SettingsInvalid" and error["details"] == [{"setting": "RATE_LIMIT_CALLS"}]
    posted = httpx.post(f"{broken.host.url}/api/provision", timeout=10,
                        json={"objectId": USERS[0], "objectTypeName": "User"})
    assert posted.status_code == 503 and "RATE_LIMIT_CALLS" in posted.json()["error"]["message"]
    for reply in (health, posted):
        assert BAD_VALUE not in reply.text

    intake_id, work_id = str(uuid.uuid4()), str(uuid.uuid4())
    broken.queue("INTAKE_QUEUE").send_message(json.dumps({"objectId": USERS[0], "objectTypeName": "User",
                                                          "correlationId": intake_id}))
    work_item = {"requestId": work_id, "servicePrincipalId": EXAMPLE_SP, "jobId": EXAMPLE_JOB, "ruleId": EXAMPLE_RULE,
                 "subject": {"objectId": USERS[1], "objectTypeName": "User"},
                 "receivedAt": datetime.now(timezone.utc).isoformat()}
    broken.queue("WORK_QUEUE").send_message(json.dumps(work_item))

    parked = {name: QueueClient.from_connection_string(broken.connection, broken.queues[name] + "-parked")
              for name in ("INTAKE_QUEUE", "WORK_QUEUE")}
    _wait(lambda: all(_count(q) == 1 for q in parked.values()), what="both messages parked")
    for name in ("INTAKE_QUEUE", "WORK_QUEUE"):
        assert _count(broken.queue(name)) == 0
        poison = QueueClient.from_connection_string(broken.connection, broken.queues[name] + "-poison")
        assert _count(poison) == 0
    assert [json.loads(m.content)["requestId"] for m in parked["WORK_QUEUE"].peek_messages()] == [work_id]
    log = broken.host.log_path.read_text()
    assert log.count("Invalid configuration") == 1, log[-3000:]  # once per start, not per message

    # The operator fixes the setting and restarts; the upkeep (run now through the admin API, as
    # an operator would, instead of waiting for its 5-minute schedule) brings the messages back.
    broken.host.stop()
    broken.env["RATE_LIMIT_CALLS"] = "5"
    broken.host = start_devhost(broken.env, log_dir=tmp_path_factory.mktemp("fixed-settings"))
    assert httpx.get(f"{broken.host.url}/api/health", timeout=10).status_code == 200
    deep = httpx.get(f"{broken.host.url}/api/health/deep", timeout=60).json()
    waiting = next(c for c in deep["checks"] if c["name"] == "Parked messages")
    assert waiting["status"] == "warn" and waiting["details"]["parked"] == {
        broken.queues["INTAKE_QUEUE"] + "-parked": 1, broken.queues["WORK_QUEUE"] + "-parked": 1}
    assert httpx.post(f"{broken.host.url}/admin/functions/lease_upkeep", json={}, timeout=10).status_code == 202
    broken.results.wait_for(lambda m: m.get("correlationId") == intake_id, timeout=60)
    broken.results.wait_for(lambda m: m.get("requestId") == work_id, timeout=60)
    assert all(_count(q) == 0 for q in parked.values())
    assert broken.deadletters.matching(lambda m: True) == []
