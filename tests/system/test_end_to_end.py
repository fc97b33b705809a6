"""End to end through devhost, real Azurite and the simulators: nothing of ours is mocked."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from azure.storage.queue import QueueClient

GOLDEN = Path(__file__).resolve().parents[2] / "simulators" / "golden"
EXAMPLES = ["example1_user_skipped", "example2_cloudsync_success", "example3_group_members"]
EXPECTED = {  # (result, errorCode, action, steps, modifiedProperties) per the API page's responses
    "example1_user_skipped": ("Skipped", "RedundantExport", "Other", 4, 7),
    "example2_cloudsync_success": ("Success", None, "Update", 4, 37),
    "example3_group_members": ("Success", None, None, 0, 0),
}
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def seed_body(name: str) -> dict:
    example = golden(name)
    return dict(example["request"], servicePrincipalId=example["servicePrincipalId"], jobId=example["jobId"])


def post(devhost, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    return httpx.post(f"{devhost.url}/api/provision", content=content, headers=headers, timeout=30, **kwargs)


def of_request(request_id: str):
    return lambda m: m.get("requestId") == request_id


def check_seed_result(result: dict, name: str) -> None:
    example = golden(name)
    expected = EXPECTED[name]
    got = (result["result"], result.get("errorCode"), result.get("action"), len(result.get("steps", [])),
           len(result.get("modifiedProperties", [])))
    assert got == expected
    assert result["servicePrincipalId"] == example["servicePrincipalId"] and result["jobId"] == example["jobId"]
    assert result["ruleId"] == example["request"]["parameters"][0]["ruleId"]
    assert result["subject"]["objectId"] == example["request"]["parameters"][0]["subjects"][0]["objectId"]
    assert result["attempts"] == 1 and result["resultId"] == f"{result['requestId']}:0"
    assert result["receivedAt"] <= result["completedAt"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_seed_example_over_http(devhost, results, sims, name):
    response = post(devhost, seed_body(name))
    assert response.status_code == 202, response.text
    [accepted] = response.json()["requests"]
    [result] = results.wait_for(of_request(accepted["requestId"]))
    check_seed_result(result, name)
    call = next(c for c in sims.graph.calls() if c.get("client_request_id") == accepted["requestId"])
    assert call["body"] == golden(name)["request"] or json.dumps(call["body"], sort_keys=True) == json.dumps(
        golden(name)["request"], sort_keys=True)


@pytest.mark.parametrize("encoding", ["plain", "base64"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_seed_example_through_the_intake_queue(devhost, azurite, results, name, encoding):
    correlation = f"queue-{name}-{encoding}"
    text = json.dumps(dict(seed_body(name), correlationId=correlation))
    if encoding == "base64":
        text = base64.b64encode(text.encode()).decode()
    QueueClient.from_connection_string(azurite.connection_string, "provision-requests").send_message(text)
    [result] = results.wait_for(lambda m: m.get("correlationId") == correlation)
    check_seed_result(result, name)


def test_compact_event_uses_default_service_principal_job_and_rule(devhost, results):
    response = post(devhost, {"objectId": "11111111-2222-4333-8444-555555555555", "objectTypeName": "User",
                              "correlationId": "HR-1001"})
    [accepted] = response.json()["requests"]
    [result] = results.wait_for(of_request(accepted["requestId"]))
    assert result["result"] == "Success" and result["correlationId"] == "HR-1001"
    assert result["action"] == "Create" and len(result["steps"]) >= 3


def test_big_group_becomes_calls_of_five_members(devhost, results, sims):
    members = [f"{i:08d}-aaaa-4bbb-8ccc-000000000000" for i in range(12)]
    response = post(devhost, {"objectId": "8213fd99-d6b6-417b-8e13-af6334856215", "objectTypeName": "Group",
                              "members": members, "ruleId": "33f7c90d-bf71-41b1-bda6-aaf0ddbee5d8#V2"})
    [accepted] = response.json()["requests"]
    assert accepted["calls"] == 3
    found = results.wait_for(of_request(accepted["requestId"]), count=3)
    assert sorted(r["callIndex"] for r in found) == [0, 1, 2]
    assert sorted(sum((r["subject"]["members"] for r in found), [])) == sorted(members)
    calls = [c for c in sims.graph.calls() if c.get("client_request_id") == accepted["requestId"]]
    assert sorted(len(c["body"]["parameters"][0]["subjects"][0]["links"]["members"]) for c in calls) == [2, 5, 5]


def test_bulk_post_answers_a_request_id_per_item(devhost, results):
    items = [{"objectId": f"{i:08d}-1111-4222-8333-444444444444", "objectTypeName": "User"} for i in range(3)]
    response = post(devhost, items)
    assert response.status_code == 202
    ids = [r["requestId"] for r in response.json()["requests"]]
    assert len(set(ids)) == 3
    for request_id in ids:
        results.wait_for(of_request(request_id))


def test_transient_failures_are_retried_then_succeed(devhost, results, sims):
    subject = "22222222-0000-4000-8000-000000000001"
    sims.graph.script(subject, {"status": 503, "body": {"error": {"code": "ServiceUnavailable", "message": "busy"}}},
                      {"status": 429, "headers": {"Retry-After": "1"}}, {"status": 502, "body": "gateway"})
    [accepted] = post(devhost, {"objectId": subject, "objectTypeName": "User"}).json()["requests"]
    [result] = results.wait_for(of_request(accepted["requestId"]), timeout=45)
    assert result["result"] == "Success" and result["attempts"] == 4


def test_permanent_failure_is_dead_lettered_with_graph_code_and_roles(devhost, results, deadletters, sims):
    subject = "33333333-0000-4000-8000-000000000001"
    sims.graph.script(subject, {"status": 403, "body": {"error": {"code": "Authorization_RequestDenied",
                                                                  "message": "Insufficient privileges."}}})
    [accepted] = post(devhost, {"objectId": subject, "objectTypeName": "User"}).json()["requests"]
    [letter] = deadletters.wait_for(lambda m: m.get("requestId") == accepted["requestId"])
    assert letter["reason"]["code"] == "Authorization_RequestDenied"
    assert "Synchronization.ReadWrite.All" in letter["reason"]["message"]
    assert json.loads(letter["original"])["subject"]["objectId"] == subject
    [result] = results.wait_for(of_request(accepted["requestId"]))
    assert result["result"] == "Error" and result["errorCode"] == "Authorization_RequestDenied"
    assert len([c for c in sims.graph.calls() if c.get("client_request_id") == accepted["requestId"]]) == 1


def test_transient_failure_gives_up_after_max_attempts(devhost, results, deadletters, sims):
    subject = "44444444-0000-4000-8000-000000000001"
    sims.graph.script(subject, *[{"status": 500, "body": {"error": {"code": "InternalServerError", "message": "x"}}}] * 4)
    [accepted] = post(devhost, {"objectId": subject, "objectTypeName": "User"}).json()["requests"]
    [letter] = deadletters.wait_for(lambda m: m.get("requestId") == accepted["requestId"], timeout=60)
    assert letter["attempts"] == 4 and "gave up after 4 attempts" in letter["reason"]["message"]


def test_answer_whose_key_is_not_json_is_kept_raw(devhost, results, sims):
    subject = "55555555-0000-4000-8000-000000000001"
    sims.graph.script(subject, {"status": 200, "body": {"key": "Microsoft.Identity.Health.Boom", "value": "{}"}})
    [accepted] = post(devhost, {"objectId": subject, "objectTypeName": "User"}).json()["requests"]
    [result] = results.wait_for(of_request(accepted["requestId"]))
    assert result["result"] == "Unknown" and result["rawKey"] == "Microsoft.Identity.Health.Boom"


def test_bad_queue_message_is_dead_lettered_at_once_with_the_original(devhost, azurite, deadletters):
    text = '{"objectId": "nope", "objectTypeName": "User", "correlationId": "bad-1"}'
    QueueClient.from_connection_string(azurite.connection_string, "provision-requests").send_message(text)
    [letter] = deadletters.wait_for(lambda m: m.get("original") == text)
    assert letter["reason"]["code"] == "ValidationFailed" and letter["source"] == "intake"
    assert letter["reason"]["details"][0]["field"] == "objectId"
    poison = QueueClient.from_connection_string(azurite.connection_string, "provision-requests-poison")
    assert not any(m.content == text for m in _peek_all(poison))


def _peek_all(queue: QueueClient):
    try:
        return list(queue.peek_messages(max_messages=32))
    except Exception:
        return []


@pytest.mark.parametrize("body,headers,status,code,field", [
    ("{nope", {"Content-Type": "application/json"}, 400, "InvalidJson", None),
    ("a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "UnsupportedMediaType", None),
    ('{"objectId": "x", "objectTypeName": "User"}', {"Content-Type": "application/json"}, 422, "ValidationFailed", "objectId"),
    ("x" * 300_000, {"Content-Type": "application/json"}, 413, "PayloadTooLarge", None),
])
def test_http_bad_input_answers_json_errors(devhost, body, headers, status, code, field):
    response = post(devhost, body, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if field:
        assert error["details"][0]["field"] == field


def test_every_window_stayed_within_the_limit(devhost, sims):
    # Runs last in this module: everything above went through one lease pool and one Graph.
    assert sims.graph.max_in_window(2.0) <= 5
    assert not [c for c in sims.graph.calls() if c.get("throttled") and not c.get("scripted")]
