"""Intake validation: the three body shapes, defaults from settings, group chunking, clear errors."""
import base64
import json
from pathlib import Path

import pytest

from shared.deadletters import dead_letter_for
from shared.errors import RequestRejected
from shared.intake.validation import accept, check_http_request, decode_queue_text
from shared.settings import Settings

GOLDEN = Path(__file__).resolve().parents[2] / "simulators" / "golden"
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"


def settings(**values) -> Settings:
    base = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    base.update(values)
    return Settings(**base)


def rejected(text: str, s: Settings | None = None) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        accept(text, s or settings())
    return info.value


@pytest.mark.parametrize("name", ["example1_user_skipped", "example2_cloudsync_success", "example3_group_members"])
def test_seed_graph_bodies_become_the_same_graph_call(name):
    example = json.loads((GOLDEN / f"{name}.json").read_text())
    body = dict(example["request"], servicePrincipalId=example["servicePrincipalId"], jobId=example["jobId"])
    [request] = accept(json.dumps(body), settings())
    [item] = request.items
    assert item.graph_body() == example["request"] or _same_call(item.graph_body(), example["request"])
    assert (item.servicePrincipalId, item.jobId) == (example["servicePrincipalId"], example["jobId"])


def _same_call(ours: dict, theirs: dict) -> bool:
    # Key order differs in the seed (subjects before ruleId); the content must not.
    return json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def test_compact_event_takes_defaults_from_settings():
    s = settings(DEFAULT_SERVICE_PRINCIPAL_ID=SP, DEFAULT_JOB_ID="scim.abc", DEFAULT_RULE_ID="rule-1")
    [request] = accept(json.dumps({"objectId": USER, "objectTypeName": "User", "correlationId": "HR-42"}), s)
    [item] = request.items
    assert (item.servicePrincipalId, item.jobId, item.ruleId, item.correlationId) == (SP, "scim.abc", "rule-1", "HR-42")


def test_missing_defaults_name_the_field_and_setting():
    error = rejected(json.dumps({"objectId": USER, "objectTypeName": "User"}))
    assert error.status == 422
    assert error.info.details[0]["field"] == "servicePrincipalId"
    assert "DEFAULT_SERVICE_PRINCIPAL_ID" in error.info.message


def test_group_of_twelve_members_becomes_three_calls_under_one_request():
    members = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(12)]
    s = settings(DEFAULT_SERVICE_PRINCIPAL_ID=SP, DEFAULT_JOB_ID="j", DEFAULT_RULE_ID="r#V2")
    [request] = accept(json.dumps({"objectId": USER, "objectTypeName": "Group", "members": members}), s)
    assert [len(i.subject.members) for i in request.items] == [5, 5, 2]
    assert {i.requestId for i in request.items} == {request.requestId}
    assert [(i.callIndex, i.callCount) for i in request.items] == [(0, 3), (1, 3), (2, 3)]
    assert sum((i.subject.members for i in request.items), []) == members


def test_graph_body_with_several_subjects_is_one_call_each():
    body = {"servicePrincipalId": SP, "jobId": "j", "parameters": [
        {"ruleId": "r1", "subjects": [{"objectId": USER, "objectTypeName": "User"},
                                      {"objectId": "CN=A,DC=x", "objectTypeName": "user"}]},
        {"ruleId": "r2", "subjects": [{"objectId": "21008", "objectTypeName": "Worker"}]}]}
    [request] = accept(json.dumps(body), settings())
    assert [(i.ruleId, i.subject.objectId) for i in request.items] == [("r1", USER), ("r1", "CN=A,DC=x"), ("r2", "21008")]


def test_bulk_array_gives_a_request_id_per_item():
    one = {"objectId": USER, "objectTypeName": "User", "servicePrincipalId": SP, "jobId": "j", "ruleId": "r"}
    requests = accept(json.dumps([one, one, one]), settings())
    assert len({r.requestId for r in requests}) == 3


@pytest.mark.parametrize("event,field,words", [
    ({"objectId": "not-a-guid", "objectTypeName": "User"}, "objectId", "GUID"),
    ({"objectId": "Ada Lovelace", "objectTypeName": "user"}, "objectId", "distinguished name"),
    ({"objectId": "a/b?c", "objectTypeName": "Worker"}, "objectId", "Worker ID"),
    ({"objectId": USER, "objectTypeName": "Contact"}, "objectTypeName", "'User'"),
    ({"objectId": USER, "objectTypeName": "User", "members": [USER]}, "members", "only allowed"),
    ({"objectId": USER, "objectTypeName": "Group", "members": ["x"]}, "members[0].objectId", "GUID"),
    ({"objectId": USER, "objectTypeName": "User", "servicePrincipalId": "../x"}, "servicePrincipalId", "GUID"),
    ({"objectId": USER, "objectTypeName": "User", "jobId": "a/../b"}, "jobId", "job id"),
    ({"objectId": USER, "objectTypeName": "User", "correlationId": "a\r\nX-Injected: 1"}, "correlationId", "match"),
    ({"objectId": USER, "objectTypeName": "User", "colour": "blue"}, "colour", "Extra"),
])
def test_bad_events_name_the_field(event, field, words):
    error = rejected(json.dumps(event))
    assert error.status == 422 and error.info.code == "ValidationFailed"
    assert any(d["field"] == field and words.lower() in d["message"].lower() for d in error.info.details), error.info.details


def test_bulk_errors_carry_the_item_index():
    good = {"objectId": USER, "objectTypeName": "User"}
    error = rejected(json.dumps([good, {"objectId": "x", "objectTypeName": "User"}]))
    assert [d["field"] for d in error.info.details] == ["[1].objectId"]


@pytest.mark.parametrize("text,status,code", [
    ("{not json", 400, "InvalidJson"), ("[]", 422, "EmptyRequest"), ("42", 422, "ValidationFailed"),
    ('{"parameters": []}', 422, "ValidationFailed"),
    ('{"parameters": [{"ruleId": "", "subjects": []}]}', 422, "ValidationFailed"),
])
def test_malformed_bodies(text, status, code):
    error = rejected(text)
    assert (error.status, error.info.code) == (status, code)


def test_http_checks_media_type_size_and_encoding():
    s = settings(MAX_BODY_BYTES="2048")
    assert check_http_request(b"{}", {"Content-Type": "application/json; charset=utf-8"}, s) == "{}"
    with pytest.raises(RequestRejected) as e:
        check_http_request(b"a=b", {"content-type": "application/x-www-form-urlencoded"}, s)
    assert e.value.status == 415
    with pytest.raises(RequestRejected) as e:
        check_http_request(b"x" * 4096, {}, s)
    assert e.value.status == 413
    with pytest.raises(RequestRejected) as e:
        check_http_request(b"\xff\xfe", {}, s)
    assert e.value.status == 400


def test_queue_text_accepts_plain_and_base64_json():
    doc = '{"objectId": "x"}'
    assert decode_queue_text(doc) == doc
    assert decode_queue_text(base64.b64encode(doc.encode())) == doc
    for bad in ["hello", base64.b64encode(b"hello").decode(), "%%%"]:
        with pytest.raises(RequestRejected):
            decode_queue_text(bad)


def test_dead_letter_keeps_the_original_and_marks_truncation():
    error = rejected("{oops")
    letter = dead_letter_for(error, "intake", "{oops")
    assert letter.original == "{oops" and letter.reason.code == "InvalidJson" and not letter.originalTruncated
    big = dead_letter_for(error, "intake", "é" * 40000, limit=1000)
    assert big.originalTruncated and len(big.original.encode()) <= 1000
