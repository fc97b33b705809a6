"""Decoding Graph's nested JSON strings, with the API page's three example responses as golden data."""
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.graph.decoding import UNKNOWN_RESULT, decode
from shared.models import GraphKeyValue

GOLDEN = Path(__file__).resolve().parents[2] / "simulators" / "golden"


def golden(name: str) -> GraphKeyValue:
    return GraphKeyValue.model_validate(json.loads((GOLDEN / f"{name}.json").read_text())["response"])


def test_example1_user_skipped_redundant_export():
    outcome = decode(golden("example1_user_skipped"))
    assert outcome.result == "Skipped"
    assert outcome.errorCode == "RedundantExport"
    assert outcome.errorMessage == "The state of the user in both the source and target systems already match."
    assert outcome.action == "Other"
    assert outcome.changeId == "g8ba3be8-1d7f-4a60-ae31-a8980da0a389"
    assert outcome.startTime == "2020-06-26T13:58:24.5494971Z"
    assert outcome.endTime == "2020-06-26T13:58:24.7682084Z"
    assert [(s.name, s.type, s.status) for s in outcome.steps] == [
        ("EntryImport", "Import", "Success"), ("EntryImport", "Matching", "Success"),
        ("EntrySynchronizationScoping", "Scoping", "Success"), ("EntrySynchronizationSkip", "Export", "Skipped")]
    assert outcome.steps[3].details == {"SkipReason": "RedundantExport"}
    assert outcome.modifiedProperties[2].displayName == "displayName"
    assert outcome.modifiedProperties[2].oldValue is None
    assert outcome.modifiedProperties[2].newValue == "Bill Bob"
    assert outcome.sourceIdentity.id == "62cf7b7a-52be-4a9b-9c69-e5d4a4a14f67"
    assert outcome.targetIdentity.type == "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    assert outcome.sourceSystem.name == "Azure Active Directory"
    assert outcome.targetSystem.name == "customappsso"
    assert outcome.statusInfo["status"] == "Skipped"
    assert outcome.rawKey is None and outcome.rawValue is None


def test_example2_cloud_sync_success_keeps_every_step_and_property():
    outcome = decode(golden("example2_cloudsync_success"))
    assert outcome.result == "Success" and outcome.errorCode is None
    assert outcome.action == "Update"
    assert outcome.changeId == "582595f3-53be-4843-bf0c-f57dbf8fae96"
    assert [s.name for s in outcome.steps] == ["EntryImportAdd", "EntryImport", "EntrySynchronizationScoping",
                                               "EntryExportUpdate"]
    assert len(outcome.modifiedProperties) == 37
    dn = next(p for p in outcome.modifiedProperties if p.displayName == "OnPremisesDistinguishedName")
    assert dn.newValue == "CN=AdeleV,CN=Users,DC=corp,DC=chicago,DC=com" and dn.oldValue is None
    # A JSON string nested three levels deep stays a string, untouched.
    token = outcome.steps[0].details["originatingReplicaToken"]
    assert json.loads(token)["Name"] == "DC01.esf.edu"
    assert outcome.sourceIdentity.type == "user" and outcome.targetSystem.name == "Azure Active Directory"


def test_example3_group_value_is_empty_object():
    outcome = decode(golden("example3_group_members"))
    assert outcome.result == "Success"
    assert outcome.steps == [] and outcome.modifiedProperties == [] and outcome.action is None
    assert outcome.rawKey is None and outcome.rawValue is None


def test_key_that_is_not_json_is_kept_raw():
    outcome = decode(GraphKeyValue(key="Microsoft.Identity.Health.SyncFabric.SomethingException: boom", value="{}"))
    assert outcome.result == UNKNOWN_RESULT
    assert outcome.rawKey.startswith("Microsoft.Identity.Health")


def test_value_that_is_not_json_is_kept_raw_and_key_still_read():
    outcome = decode(GraphKeyValue(key='{"result":"Failure","details":{"errorCode":"EntryConflict","errorMessage":"dup"}}',
                                   value="<html>oops</html>"))
    assert (outcome.result, outcome.errorCode, outcome.errorMessage) == ("Failure", "EntryConflict", "dup")
    assert outcome.rawValue == "<html>oops</html>" and outcome.rawKey is None


def test_unknown_fields_and_malformed_entries_cost_only_themselves():
    value = {"action": "Create", "futureField": {"x": 1},
             "provisioningSteps": [{"name": "A", "type": "Import", "status": "Success", "newThing": 3},
                                   "not-a-step", {"name": ["bad"]}],
             "modifiedProperties": [{"displayName": "n", "oldValue": 1, "newValue": True}],
             "sourceIdentity": "weird"}
    outcome = decode(GraphKeyValue(key='{"result":"Warning"}', value=json.dumps(value)))
    assert outcome.result == "Warning" and outcome.action == "Create"
    assert [s.name for s in outcome.steps] == ["A"]
    assert (outcome.modifiedProperties[0].oldValue, outcome.modifiedProperties[0].newValue) == ("1", "True")
    assert outcome.sourceIdentity is None


@pytest.mark.parametrize("key,value", [(None, None), ("", ""), ("[]", "[]"), ("null", "null"), ('{"result": 5}', "{}")])
def test_degenerate_answers_decode(key, value):
    outcome = decode(GraphKeyValue(key=key, value=value))
    assert outcome.result in (UNKNOWN_RESULT, "5")


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()))
def test_decode_never_raises(key, value):
    outcome = decode(GraphKeyValue(key=key, value=value))
    assert isinstance(outcome.result, str)


# --- answer shapes, verdicts and diagnoses -----------------------------------------------------------

from shared.graph.decoding import (  # noqa: E402
    STATUS_INFO_KEY,
    UNKNOWN_401_DIAGNOSIS,
    failure_outcome,
)
from shared.graph.out_of_scope import (  # noqa: E402
    MAX_OUT_OF_SCOPE_RETRIES,
    decide_out_of_scope_retry,
)
from shared.models import Verdict, WorkItem  # noqa: E402
from shared.settings import Settings  # noqa: E402

TUTORIAL = json.loads((GOLDEN / "statusinfo_tutorial.json").read_text())
VERDICTS = set(Verdict.__args__)


@pytest.mark.parametrize("name,shape,verdict,reason", [
    ("example1_user_skipped", "documented", "noChange", "RedundantExport"),
    ("example2_cloudsync_success", "documented", "updated", "EntryExportUpdate"),
    ("example3_group_members", "group", "unknown", "SucceededWithoutSteps"),
])
def test_the_api_pages_three_examples_get_their_verdicts(name, shape, verdict, reason):
    outcome = decode(golden(name))
    assert (outcome.answerShape, outcome.verdict, outcome.reasonCode) == (shape, verdict, reason)


def test_the_group_answer_says_where_to_look():
    assert "provisioning logs" in decode(golden("example3_group_members")).diagnosis


def test_tutorial_statusinfo_answer_exactly_as_printed_is_recognised_and_kept_raw():
    # The tutorial prints the value cut off (and with a trailing comma): not JSON, so nothing is invented.
    answer = GraphKeyValue.model_validate(TUTORIAL["response"])
    outcome = decode(answer)
    assert outcome.answerShape == "statusInfo"
    assert (outcome.result, outcome.verdict, outcome.reasonCode) == (UNKNOWN_RESULT, "unknown", "Unreadable")
    assert outcome.rawKey is None and outcome.rawValue == TUTORIAL["response"]["value"]
    assert "rawKey/rawValue" in outcome.diagnosis


def test_tutorial_statusinfo_answer_completed_derives_its_result_from_the_steps():
    outcome = decode(GraphKeyValue.model_validate(TUTORIAL["completed"]))
    assert outcome.answerShape == "statusInfo"
    assert (outcome.result, outcome.verdict, outcome.reasonCode) == ("Success", "created", "EntryExportAdd")
    assert [s.name for s in outcome.steps] == ["EntryImport", "EntryImport", "EntrySynchronizationScoping",
                                               "EntryExportAdd"]
    assert outcome.steps[0].details["userPrincipalName"] == "user1@fabrikam.com"
    assert outcome.rawKey is None and outcome.rawValue is None and outcome.errorCode is None


def _status_info(*steps: dict, extra: dict | None = None) -> GraphKeyValue:
    return GraphKeyValue(key=STATUS_INFO_KEY, value=json.dumps([{"provisioningSteps": list(steps), **(extra or {})}]))


def _step(name: str, type_: str, status: str, **details: str) -> dict:
    return {"name": name, "type": type_, "status": status, "details": details}


OTHER = {"action": "Other"}
IMPORT = _step("EntryImport", "Import", "Success")
SCOPED = _step("EntrySynchronizationScoping", "Scoping", "Success")


@pytest.mark.parametrize("steps,result,verdict,reason", [
    ([IMPORT, SCOPED, _step("EntryExportAdd", "Export", "Success")], "Success", "created", "EntryExportAdd"),
    ([IMPORT, SCOPED, _step("EntryExportUpdate", "Export", "Success")], "Success", "updated", "EntryExportUpdate"),
    ([IMPORT, SCOPED, _step("EntryExportDelete", "Export", "Success")], "Success", "deleted", "EntryExportDelete"),
    ([IMPORT, SCOPED, _step("EntryExportUpdateSoftDelete", "Export", "Success")], "Success", "disabled",
     "EntryExportUpdateSoftDelete"),
    ([IMPORT, SCOPED, _step("EntrySynchronizationSkip", "Export", "Skipped", SkipReason="RedundantExport")],
     "Skipped", "noChange", "RedundantExport"),
    ([IMPORT, _step("EntrySynchronizationSkip", "Export", "Skipped", SkipReason="NotEffectivelyEntitled")],
     "Skipped", "outOfScope", "NotEffectivelyEntitled"),
    ([IMPORT, _step("EntrySynchronizationScoping", "Scoping", "Skipped")], "Skipped", "outOfScope", "ScopingSkipped"),
    ([IMPORT, SCOPED, _step("EntryExportAdd", "Export", "Failure", ErrorCode="EntryConflict")], "Failure", "failed",
     "EntryConflict"),
    ([IMPORT], "Success", "unknown", "Success"),
])
def test_statusinfo_steps_decide_result_and_verdict(steps, result, verdict, reason):
    outcome = decode(_status_info(*steps))
    assert (outcome.result, outcome.verdict, outcome.reasonCode) == (result, verdict, reason)


@pytest.mark.parametrize("key,value,verdict,reason", [
    ({"result": "Success", "details": {}}, {"action": "Create", "provisioningSteps": []}, "created", "action:Create"),
    ({"result": "Success", "details": {}}, {"action": "Disable"}, "disabled", "action:Disable"),
    ({"result": "Skipped", "details": {"errorCode": "NotEffectivelyEntitled"}}, OTHER, "outOfScope",
     "NotEffectivelyEntitled"),
    ({"result": "Failure", "details": {"errorCode": "InsufficientRights"}}, OTHER, "failed", "InsufficientRights"),
    ({"result": "Failure", "details": {}}, OTHER, "failed", "Failure"),
    ({"result": "Skipped", "details": {"errorCode": "SomethingNew"}}, OTHER, "unknown", "SomethingNew"),
    ({"result": "Warning", "details": {}}, {"provisioningSteps": [_step("EntryExportUpdate", "Export", "Warning")]},
     "updated", "EntryExportUpdate"),
])
def test_documented_shape_verdicts(key, value, verdict, reason):
    outcome = decode(GraphKeyValue(key=json.dumps(key), value=json.dumps(value)))
    assert outcome.answerShape == "documented"
    assert (outcome.verdict, outcome.reasonCode) == (verdict, reason)


@pytest.mark.parametrize("value", ["[]", '[{"provisioningSteps":[]}]', '[{"other":1}]', '{"a":1}', "[1]"])
def test_a_statusinfo_answer_without_steps_is_unknown_and_kept_raw(value):
    outcome = decode(GraphKeyValue(key=STATUS_INFO_KEY, value=value))
    assert (outcome.answerShape, outcome.result, outcome.verdict, outcome.reasonCode) == (
        "statusInfo", UNKNOWN_RESULT, "unknown", "Unreadable")
    assert outcome.rawValue == value and outcome.rawKey is None


def test_out_of_scope_says_what_to_do():
    outcome = decode(_status_info(IMPORT, _step("EntrySynchronizationSkip", "Export", "Skipped",
                                                SkipReason="NotEffectivelyEntitled")))
    assert "not assigned to the app or not in scope yet; assignments take a few minutes to apply" in outcome.diagnosis
    assert outcome.errorCode == "NotEffectivelyEntitled"


def test_401_unknown_error_with_empty_message_names_the_ownership_trap():
    outcome = failure_outcome("Error", "UnknownError", "Graph answered 401", 401)
    assert (outcome.verdict, outcome.reasonCode) == ("failed", "UnknownError")
    assert outcome.diagnosis == UNKNOWN_401_DIAGNOSIS
    assert ("the identity lacks the role, or with Application.ReadWrite.OwnedBy it does not own the enterprise app's "
            "service principal (owning the app registration is not enough)") in outcome.diagnosis
    assert failure_outcome("Error", "InvalidAuthenticationToken", "expired", 401).diagnosis is None
    assert failure_outcome("Error", "UnknownError", "boom", 500).diagnosis is None


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text(), st.just("[]"), st.just('[{"a":1}]')))
def test_every_answer_gets_a_verdict_and_a_reason(key, value):
    for k in (key, STATUS_INFO_KEY):
        outcome = decode(GraphKeyValue(key=k, value=value))
        assert outcome.verdict in VERDICTS and outcome.reasonCode
        assert outcome.answerShape in ("documented", "group", "statusInfo", "unreadable")


# --- out-of-scope retry decision -------------------------------------------------------------------

def _item(retries: int = 0) -> WorkItem:
    return WorkItem.model_validate({"requestId": "r", "servicePrincipalId": "sp", "jobId": "j", "ruleId": "x",
                                    "subject": {"objectId": "o", "objectTypeName": "User"},
                                    "receivedAt": "2026-01-01T00:00:00Z", "outOfScopeRetries": retries})


def settings_with(**values: str) -> Settings:
    return Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", **values)


OUT_OF_SCOPE = decode(GraphKeyValue(key='{"result":"Skipped","details":{"errorCode":"NotEffectivelyEntitled"}}', value="{}"))


def test_out_of_scope_retry_is_off_by_default():
    assert settings_with().out_of_scope_retry_minutes == 0
    assert decide_out_of_scope_retry(OUT_OF_SCOPE, _item(), settings_with()) is None


def test_out_of_scope_retry_waits_the_setting_at_most_twice():
    settings = settings_with(OUT_OF_SCOPE_RETRY_MINUTES="3")
    assert [decide_out_of_scope_retry(OUT_OF_SCOPE, _item(n), settings) for n in range(4)] == [180.0, 180.0, None, None]
    assert MAX_OUT_OF_SCOPE_RETRIES == 2


def test_only_out_of_scope_answers_are_retried():
    settings = settings_with(OUT_OF_SCOPE_RETRY_MINUTES="3")
    assert decide_out_of_scope_retry(decode(golden("example1_user_skipped")), _item(), settings) is None
