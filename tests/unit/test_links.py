"""Links (synchronizationLinkedObjects): manager and owners in both body shapes, validated like
members, sent to Graph as given, echoed in the dry run and in the results' subject."""
import json

import pytest

from shared.errors import RequestRejected
from shared.intake import dry_run
from shared.intake.validation import accept
from shared.models import MAX_GROUP_MEMBERS_PER_CALL, ResultMessage
from shared.settings import Settings

SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
BOSS = "0b3e6b3c-2a54-4f6e-9a49-1d0c7a1f2b01"
OWNER = "5d2f4c1a-7e6b-4b8d-9c1e-2f3a4b5c6d02"
GROUP = "8213fd99-d6b6-417b-8e13-af6334856215"


def settings() -> Settings:
    return Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=SP,
                    DEFAULT_JOB_ID="job", DEFAULT_RULE_ID="rule")


def graph_body(subject: dict) -> str:
    return json.dumps({"parameters": [{"subjects": [subject]}]})


def accepted_calls(text: str) -> list[dict]:
    [request] = accept(text, settings())
    return [item.graph_body()["parameters"][0]["subjects"][0] for item in request.items]


def rejected(text: str) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        accept(text, settings())
    assert info.value.status == 422
    return info.value


def test_a_users_manager_is_sent_as_given_in_the_graph_shape():
    subject = {"objectId": USER, "objectTypeName": "User",
               "links": {"manager": {"objectId": BOSS, "objectTypeName": "User"}}}
    assert accepted_calls(graph_body(subject)) == [subject]


def test_the_compact_shape_takes_manager_and_owners_as_ids_or_objects():
    [call] = accepted_calls(json.dumps({"objectId": USER, "objectTypeName": "User", "manager": BOSS}))
    assert call["links"] == {"manager": {"objectId": BOSS, "objectTypeName": "User"}}
    [call] = accepted_calls(json.dumps({"objectId": GROUP, "objectTypeName": "Group",
                                        "owners": [OWNER, {"objectId": BOSS}]}))
    assert call["links"] == {"owners": [{"objectId": OWNER, "objectTypeName": "User"},
                                        {"objectId": BOSS, "objectTypeName": "User"}]}


def test_group_owners_travel_with_every_chunk_of_members():
    members = [f"00000000-0000-4000-8000-{i:012d}" for i in range(MAX_GROUP_MEMBERS_PER_CALL + 1)]
    calls = accepted_calls(json.dumps({"objectId": GROUP, "objectTypeName": "Group", "members": members,
                                       "owners": [OWNER]}))
    assert len(calls) == 2
    assert all(c["links"]["owners"] == [{"objectId": OWNER, "objectTypeName": "User"}] for c in calls)
    assert [len(c["links"]["members"]) for c in calls] == [MAX_GROUP_MEMBERS_PER_CALL, 1]


@pytest.mark.parametrize("text,field,words", [
    (graph_body({"objectId": GROUP, "objectTypeName": "Group", "links": {"manager": {"objectId": BOSS}}}),
     "parameters[0].subjects[0].links", "manager is only allowed when objectTypeName is 'User', not 'Group'"),
    (graph_body({"objectId": USER, "objectTypeName": "User", "links": {"owners": [{"objectId": OWNER}]}}),
     "parameters[0].subjects[0].links", "owners are only allowed when objectTypeName is 'Group', not 'User'"),
    (json.dumps({"objectId": GROUP, "objectTypeName": "Group", "manager": BOSS}), "manager",
     "manager is only allowed when objectTypeName is 'User'"),
    (json.dumps({"objectId": "CN=Ada,DC=corp,DC=example", "objectTypeName": "user", "manager": BOSS}), "manager",
     "not 'user'"),
    (json.dumps({"objectId": USER, "objectTypeName": "User", "owners": [OWNER]}), "owners",
     "owners are only allowed when objectTypeName is 'Group'"),
])
def test_a_link_the_subject_type_cannot_have_is_a_422_naming_the_field(text, field, words):
    details = rejected(text).info.details
    assert any(d["field"] == field and words in d["message"] for d in details), details


@pytest.mark.parametrize("text,field", [
    (graph_body({"objectId": USER, "objectTypeName": "User", "links": {"manager": {"objectId": "not-a-guid"}}}),
     "parameters[0].subjects[0].links.manager.objectId"),
    (graph_body({"objectId": USER, "objectTypeName": "User",
                 "links": {"manager": {"objectId": BOSS, "objectTypeName": "Group"}}}),
     "parameters[0].subjects[0].links.manager.objectTypeName"),
    (graph_body({"objectId": GROUP, "objectTypeName": "Group", "links": {"owners": [{"objectId": "x"}]}}),
     "parameters[0].subjects[0].links.owners[0].objectId"),
    (graph_body({"objectId": GROUP, "objectTypeName": "Group", "links": {"admins": []}}),
     "parameters[0].subjects[0].links.admins"),
    (json.dumps({"objectId": GROUP, "objectTypeName": "Group", "owners": ["nope"]}), "owners[0].objectId"),
])
def test_malformed_links_are_a_422_naming_the_field(text, field):
    details = rejected(text).info.details
    assert any(d["field"] == field for d in details), details


def test_the_dry_run_shows_the_links_graph_will_get():
    subject = {"objectId": USER, "objectTypeName": "User", "links": {"manager": {"objectId": BOSS, "objectTypeName": "User"}}}
    described = dry_run.describe(accept(graph_body(subject), settings()), settings())
    assert described["requests"][0]["calls"][0]["body"]["parameters"][0]["subjects"][0] == subject


def test_results_echo_the_links():
    [request] = accept(json.dumps({"objectId": GROUP, "objectTypeName": "Group", "owners": [OWNER]}), settings())
    item = request.items[0]
    result = ResultMessage(result="Success", resultId=item.call_id, requestId=item.requestId,
                           servicePrincipalId=SP, jobId="job", ruleId="rule", subject=item.subject, callIndex=0,
                           callCount=1, attempts=1, receivedAt=item.receivedAt, completedAt=item.receivedAt)
    assert json.loads(result.model_dump_json())["subject"]["owners"] == [OWNER]


def test_calls_with_different_links_never_coalesce():
    from shared.status.rows import group_key

    def key(**links: str) -> str:
        [request] = accept(json.dumps({"objectId": USER, "objectTypeName": "User", **links}), settings())
        return group_key(request.items[0])

    assert key() == key()
    assert key(manager=BOSS) == key(manager=BOSS)
    assert len({key(), key(manager=BOSS), key(manager=OWNER)}) == 3
