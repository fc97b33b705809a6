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
