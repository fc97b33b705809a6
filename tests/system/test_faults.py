"""Fault injection against the whole app (devhost + real Azurite + simulators): Graph failing in
every way it can, the managed identity endpoint going away, and Azurite itself restarting.
Each case checks that nothing is lost and nothing crash-loops."""
from __future__ import annotations

import time

import pytest

from devhost.azurite import Azurite, free_port
from scripts.local_stack import start_devhost
from tests.system.test_scale_out import Cluster, user

ERROR = {"error": {"code": "Oops", "message": "simulated"}}
TRANSIENT = {
    "500": {"status": 500, "body": ERROR},
    "502": {"status": 502, "body": "<html>bad gateway</html>"},
    "503": {"status": 503, "body": ERROR, "headers": {"Retry-After": "1"}},
    "504": {"status": 504, "body": ERROR},
    "429 with Retry-After": {"status": 429, "body": ERROR, "headers": {"Retry-After": "1"}},
    "429 without Retry-After": {"status": 429, "body": ERROR},
    "slower than our timeout": {"status": 200, "delay": 4.0, "key": '{"result":"Success","details":{}}', "value": "{}"},
    "connection reset": {"reset": True},
}


@pytest.fixture(scope="module")
def faulty(azurite, tmp_path_factory):
    c = Cluster(azurite, tmp_path_factory.mktemp("faults"), hosts=2, GRAPH_TIMEOUT_SECONDS="2", MAX_ATTEMPTS="4")
    c.warm_up()
    yield c
    c.stop()


def test_transient_graph_faults_are_retried_and_succeed(faulty):
    subjects = {name: user(300 + i) for i, name in enumerate(TRANSIENT)}
    for name, subject in subjects.items():
        faulty.sims.graph.script(subject, TRANSIENT[name])
    ids = faulty.request_ids([{"objectId": s, "objectTypeName": "User"} for s in subjects.values()])
    found = faulty.wait_all(ids, timeout=120)
    by_subject = {r[0]["subject"]["objectId"]: r[0] for r in found.values()}
    for name, subject in subjects.items():
        result = by_subject[subject]
        assert (result["result"], result["attempts"]) == ("Success", 2), name
    assert faulty.sims.graph.max_in_window(2.0) <= 5


def test_answers_that_cannot_be_read_or_are_refused_end_with_a_reason(faulty):
    unreadable, refused, not_json = user(400), user(401), user(402)
    faulty.sims.graph.script(unreadable, {"status": 200, "key": "Microsoft.Identity.Health.Boom", "value": "not json"})
    faulty.sims.graph.script(refused, {"status": 400, "body": {"error": {"code": "RequestParameterInvalid",
                                                                         "message": "bad rule"}}})
    # Issue 13 N4: a 200 means Graph acted; a body that is not the envelope is kept, never retried.
    faulty.sims.graph.script(not_json, {"status": 200, "body": "<html>maintenance</html>"})
    ids = faulty.request_ids([{"objectId": unreadable, "objectTypeName": "User"},
                              {"objectId": refused, "objectTypeName": "User"},
                              {"objectId": not_json, "objectTypeName": "User"}])
    found = faulty.wait_all(ids, timeout=60)
    [kept_raw], [error], [kept_body] = found[ids[0]], found[ids[1]], found[ids[2]]
    assert kept_raw["result"] == "Unknown" and kept_raw["rawValue"] == "not json"
    assert (kept_body["result"], kept_body["attempts"], kept_body["errorCode"]) == ("Unknown", 1, "UnreadableGraphAnswer")
    assert "maintenance" in kept_body["rawBody"]
    assert len([c for c in faulty.sims.graph.calls() if c.get("objectId") == not_json]) == 1
    assert error["result"] == "Error" and error["errorCode"] == "RequestParameterInvalid"
    [letter] = faulty.deadletters.wait_for(lambda m: m.get("requestId") == ids[1])
    assert letter["reason"]["code"] == "RequestParameterInvalid"


def test_identity_endpoint_outage_delays_but_loses_nothing(faulty):
    # Only fresh hosts, which have no cached token, so every call really needs the endpoint.
    for host in faulty.hosts:
        host.stop()
    faulty.sims.identity.fail("down", seconds=8)
    outage_ends = time.monotonic() + 8
    faulty.hosts = [start_devhost(faulty.env, log_dir=faulty.log_dir)]
    faulty.sims.graph.reset_calls()
    ids = faulty.request_ids([{"objectId": user(500 + i), "objectTypeName": "User"} for i in range(3)])
    found = faulty.wait_all(ids, timeout=120)
    assert all(r[0]["result"] == "Success" and r[0]["attempts"] == 1 for r in found.values())
    assert faulty.sims.identity.stats()["faulted"] >= 1
    assert all(c["arrival"] >= outage_ends - 0.5 for c in faulty.sims.graph.calls()), "called Graph without a token?"


def test_azurite_restart_mid_run_loses_nothing(tmp_path):
    storage = Azurite(free_port(), free_port(), free_port(), location=str(tmp_path / "data"), persistent=True).start()
    c = Cluster(storage, tmp_path, hosts=2)
    try:
        c.warm_up()
        ids = c.request_ids([{"objectId": user(600 + i), "objectTypeName": "User"} for i in range(20)])
        time.sleep(2)
        storage.stop()              # every queue, lease token and booked slot is on disk
        time.sleep(3)
        storage.start()
        found = c.wait_all(ids, timeout=180)
        assert set(found) == set(ids)
        assert c.sims.graph.max_in_window(2.0) <= 5
    finally:
        c.stop()
        storage.stop()
