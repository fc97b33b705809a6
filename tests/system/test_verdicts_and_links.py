"""Links, verdicts and diagnoses end to end: devhost, Azurite, the real azure-identity credential
against the identity simulator and the Graph simulator; nothing of ours is mocked.

The host's identity holds only Application.ReadWrite.OwnedBy and owns EXAMPLE_SP, so the
ownership trap (401 UnknownError with an empty message) can be shown on a service principal it
does not own. OUT_OF_SCOPE_RETRY_MINUTES is 0.05 (3 s) so the retry path runs in test time."""
from __future__ import annotations

import json

import httpx
import pytest

from scripts.local_stack import EXAMPLE_SP
from simulators import SIM_OBJECT_ID
from tests.conftest import IsolatedHost

USER = "4a1b2c3d-0000-4000-8000-00000000aa01"
BOSS = "0b3e6b3c-2a54-4f6e-9a49-1d0c7a1f2b01"
OWNER = "5d2f4c1a-7e6b-4b8d-9c1e-2f3a4b5c6d02"
GROUP = "8213fd99-d6b6-417b-8e13-af6334856215"
NOT_OWNED_SP = "6e0f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
RETRY_SECONDS = 3.0


@pytest.fixture(scope="module")
def app(azurite, tmp_path_factory):
    host = IsolatedHost(azurite, tmp_path_factory.mktemp("verdicts"), "vrd", DEFAULT_RULE_ID="rule-1",
                        OUT_OF_SCOPE_RETRY_MINUTES=str(RETRY_SECONDS / 60))
    # Before the host's first token: the credential caches it with these roles.
    host.sims.identity.set_roles(["Application.ReadWrite.OwnedBy"])
    host.sims.graph.set_owners(EXAMPLE_SP, [SIM_OBJECT_ID])
    host.sims.graph.set_owners(NOT_OWNED_SP, ["someone-else"])
    yield host
    host.stop()


def accepted_id(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    [accepted] = response.json()["requests"]
    return accepted["requestId"]


def graph_calls(app, request_id: str) -> list[dict]:
    return [c for c in app.sims.graph.calls() if c.get("client_request_id") == request_id]


def test_a_users_manager_reaches_graph_and_comes_back_in_the_result(app):
    request_id = accepted_id(app.post({"objectId": USER, "objectTypeName": "User", "manager": BOSS}))
    result = app.result(request_id)
    assert result["subject"]["manager"] == BOSS
    assert (result["verdict"], result["reasonCode"], result["answerShape"]) == ("created", "EntryExportAdd", "documented")
    [call] = graph_calls(app, request_id)
    assert call["body"]["parameters"][0]["subjects"][0]["links"] == {
        "manager": {"objectId": BOSS, "objectTypeName": "User"}}
    status = httpx.get(f"{app.host.url}/api/provision/{request_id}", timeout=10).json()
    assert status["calls"][0]["result"]["verdict"] == "created"
    assert status["calls"][0]["result"]["subject"]["manager"] == BOSS


def test_group_owners_in_the_graph_shape_are_sent_as_given(app):
    subject = {"objectId": GROUP, "objectTypeName": "Group",
               "links": {"owners": [{"objectId": OWNER, "objectTypeName": "User"}]}}
    request_id = accepted_id(app.post({"parameters": [{"ruleId": "rule-1", "subjects": [subject]}]}))
    result = app.result(request_id)
    assert result["subject"]["owners"] == [OWNER]
    [call] = graph_calls(app, request_id)
    assert call["body"]["parameters"][0]["subjects"][0] == subject


def test_a_manager_on_a_group_is_a_422_naming_the_field_and_nothing_is_sent(app):
    before = len(app.sims.graph.calls())
    response = app.post({"objectId": GROUP, "objectTypeName": "Group", "manager": BOSS})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "ValidationFailed" and error["message"]
    assert [d["field"] for d in error["details"]] == ["manager"]
    assert "manager is only allowed when objectTypeName is 'User'" in error["details"][0]["message"]
    graph_shape = app.post({"parameters": [{"subjects": [{"objectId": GROUP, "objectTypeName": "Group",
                                                          "links": {"manager": {"objectId": BOSS}}}]}]})
    assert graph_shape.status_code == 422
    assert graph_shape.json()["error"]["details"][0]["field"] == "parameters[0].subjects[0].links"
    assert len(app.sims.graph.calls()) == before


def test_the_dry_run_shows_the_links(app):
    response = app.post({"objectId": USER, "objectTypeName": "User", "manager": BOSS}, dryRun="true")
    assert response.status_code == 200, response.text
    [call] = response.json()["requests"][0]["calls"]
    assert call["body"]["parameters"][0]["subjects"][0]["links"]["manager"]["objectId"] == BOSS


def test_a_cross_tenant_jobs_statusinfo_answer_gets_its_verdict_from_the_steps(app):
    app.sims.graph.set_job(EXAMPLE_SP, "cross-tenant-job", template_id="Azure2Azure")
    request_id = accepted_id(app.post({"objectId": USER, "objectTypeName": "User", "jobId": "cross-tenant-job"}))
    result = app.result(request_id)
    assert (result["answerShape"], result["result"], result["verdict"], result["reasonCode"]) == (
        "statusInfo", "Success", "created", "EntryExportAdd")
    assert result.get("rawKey") is None and result.get("rawValue") is None
    assert [s["name"] for s in result["steps"]][-1] == "EntryExportAdd"


def test_a_subject_not_in_scope_yet_is_retried_through_the_queue_and_the_result_says_so(app):
    subject = "4a1b2c3d-0000-4000-8000-00000000aa02"
    app.sims.graph.set_out_of_scope(subject, calls=1)
    request_id = accepted_id(app.post({"objectId": subject, "objectTypeName": "User"}))
    result = app.result(request_id, timeout=45)
    assert (result["verdict"], result["outOfScopeRetries"], result["attempts"]) == ("created", 1, 2)
    first, second = graph_calls(app, request_id)
    # Held by the work queue (whole-second visibility, surfacing SCHEDULE_LEAD_SECONDS early), not by a sleeping function.
    assert second["wall_time"] - first["wall_time"] >= 1.0


def test_a_subject_that_stays_out_of_scope_is_reported_after_two_retries_with_what_to_do(app):
    subject = "4a1b2c3d-0000-4000-8000-00000000aa03"
    app.sims.graph.set_out_of_scope(subject, calls=10)
    request_id = accepted_id(app.post({"objectId": subject, "objectTypeName": "User"}))
    result = app.result(request_id, timeout=60)
    assert (result["result"], result["verdict"], result["reasonCode"]) == ("Skipped", "outOfScope",
                                                                          "NotEffectivelyEntitled")
    assert (result["outOfScopeRetries"], result["attempts"]) == (2, 3)
    assert "not assigned to the app or not in scope yet; assignments take a few minutes to apply" in result["diagnosis"]
    assert len(graph_calls(app, request_id)) == 3


def test_owned_by_without_owning_the_service_principal_gets_a_diagnosis(app):
    request_id = accepted_id(app.post({"objectId": USER, "objectTypeName": "User",
                                        "servicePrincipalId": NOT_OWNED_SP}))
    result = app.result(request_id)
    assert (result["result"], result["verdict"], result["errorCode"]) == ("Error", "failed", "UnknownError")
    assert ("the identity lacks the role, or with Application.ReadWrite.OwnedBy it does not own the enterprise app's "
            "service principal (owning the app registration is not enough)") in result["diagnosis"]
    [dead] = app.deadletters.wait_for(lambda m: m.get("requestId") == request_id)
    assert dead["reason"]["code"] == "UnknownError"
    assert json.loads(dead["original"])["servicePrincipalId"] == NOT_OWNED_SP
    assert len(graph_calls(app, request_id)) == 1  # permanent: not retried
