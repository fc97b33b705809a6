"""Subjects and applications by name, end to end: devhost, Azurite, the real azure-identity
credential against the identity simulator, and the Graph simulator's directory (simulators/directory.py)."""
from __future__ import annotations

import base64
import json
import uuid

import httpx

from scripts.local_stack import EXAMPLE_RULE
from simulators.directory import directory_of
from tests.conftest import IsolatedHost, module_host, wait_until

ROLES = ["Synchronization.ReadWrite.All", "User.Read.All", "Group.Read.All", "Application.Read.All"]
OBRIEN = {"userPrincipalName": "o'brien@contoso.com", "mail": "sean.obrien@contoso.com", "employeeId": "E-1001"}
HR_SP = "7d3f9a40-5b1e-4c2d-8e6f-9a0b1c2d3e4f"


class NamesHost(IsolatedHost):
    def __init__(self, azurite, log_dir):
        super().__init__(azurite, log_dir, "names", DEFAULT_RULE_ID=EXAMPLE_RULE, NAME_CACHE_SECONDS="600",
                         AzureFunctionsJobHost__extensions__queues__visibilityTimeout="00:00:01")
        # Before the app's first token: the credential caches it with these roles.
        self.sims.identity.set_roles(ROLES)
        self.directory = directory_of(self.sims.graph)
        added = self.directory.add(
            users=[OBRIEN, {"userPrincipalName": "ada@contoso.com", "mail": "ada@contoso.com", "employeeId": "E-7"}],
            groups=[{"displayName": "Sales", "mailNickname": "sales-eu"},
                    {"displayName": "Sales", "mailNickname": "sales-us"},
                    {"displayName": "Finance", "mailNickname": "finance"}],
            servicePrincipals=[{"id": HR_SP, "appId": str(uuid.uuid4()), "displayName": "Contoso HR",
                                "jobs": ["scim.0a1b2c"]},
                               {"displayName": "Two Jobs", "jobs": ["scim.a", "scim.b"]}])
        self.users = {u["userPrincipalName"]: u["id"] for u in added["users"]}

    def lookups(self, prop: str, value: str) -> int:
        return sum(1 for c in self.directory.calls if c["query"].get("$filter", "").startswith(f"{prop} eq ")
                   and value.replace("'", "''") in c["query"]["$filter"])


names = module_host("names", NamesHost)


def provision_calls(host: IsolatedHost) -> list[dict]:
    return [c for c in host.sims.graph.calls() if c["route"] == "provision_on_demand"]


def test_user_by_principal_name_with_a_quote_reaches_graph_by_object_id_and_keeps_both(names):
    result = names.result_of({"objectTypeName": "User", "userPrincipalName": OBRIEN["userPrincipalName"]})
    object_id = names.users[OBRIEN["userPrincipalName"]]
    assert result["subject"]["objectId"] == object_id
    assert result["subject"]["name"] == {"property": "userPrincipalName", "value": "o'brien@contoso.com"}
    [call] = [c for c in provision_calls(names) if c["client_request_id"] == result["requestId"]]
    assert call["body"]["parameters"][0]["subjects"] == [{"objectId": object_id, "objectTypeName": "User"}]


def test_employee_id_lookup_sends_the_advanced_query_headers(names):
    result = names.result_of({"objectTypeName": "User", "employeeId": "E-7"})
    assert result["subject"]["objectId"] == names.users["ada@contoso.com"]
    [call] = [c for c in names.directory.calls if "employeeId" in c["query"].get("$filter", "")]
    assert call["consistencyLevel"] == "eventual" and call["query"]["$count"] == "true" and call["status"] == 200


def test_answers_are_cached_and_lookups_never_call_provision_on_demand(names):
    before = len(provision_calls(names))
    for _ in range(3):
        response = names.post({"objectTypeName": "User", "mail": "sean.obrien@contoso.com"}, dryRun="true")
        assert response.status_code == 200, response.text
        [call] = response.json()["requests"][0]["calls"]
        assert call["subjectName"] == {"property": "mail", "value": "sean.obrien@contoso.com"}
        assert call["body"]["parameters"][0]["subjects"][0]["objectId"] == names.users[OBRIEN["userPrincipalName"]]
    assert names.lookups("mail", "sean.obrien@contoso.com") == 1
    assert len(provision_calls(names)) == before


def test_unknown_name_is_a_422_naming_what_was_looked_for(names):
    before = len(provision_calls(names))
    response = names.post({"objectTypeName": "User", "userPrincipalName": "nobody@contoso.com"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "NameNotFound" and "nobody@contoso.com" in error["message"]
    assert error["details"] == [{"field": "(body)", "property": "userPrincipalName", "value": "nobody@contoso.com"}]
    assert len(provision_calls(names)) == before


def test_ambiguous_group_name_lists_candidates(names):
    response = names.post({"parameters": [{"subjects": [{"objectTypeName": "Group", "displayName": "Sales"}]}]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "NameAmbiguous" and error["details"][0]["field"] == "parameters[0].subjects[0]"
    assert sorted(c["mailNickname"] for c in error["details"][0]["candidates"]) == ["sales-eu", "sales-us"]


def test_application_by_display_name_resolves_its_only_job(names):
    result = names.result_of({"objectTypeName": "Group", "mailNickname": "finance", "application": "Contoso HR"})
    assert (result["servicePrincipalId"], result["jobId"]) == (HR_SP, "scim.0a1b2c")
    several = names.post({"objectTypeName": "Group", "mailNickname": "finance", "application": "Two Jobs"})
    assert several.status_code == 422 and several.json()["error"]["code"] == "JobNotDetermined"
    assert [c["jobId"] for c in several.json()["error"]["details"][0]["candidates"]] == ["scim.a", "scim.b"]


def test_unknown_name_on_the_queue_door_is_dead_lettered_with_the_original(names):
    text = json.dumps({"objectTypeName": "Group", "mailNickname": "ghosts", "correlationId": "q-ghosts"})
    sent = base64.b64encode(text.encode()).decode()
    names.queue("INTAKE_QUEUE").send_message(sent)
    [letter] = names.deadletters.wait_for(lambda m: m.get("original") == sent)
    assert letter["reason"]["code"] == "NameNotFound" and letter["source"] == "intake"
    assert letter["reason"]["details"][0]["value"] == "ghosts"


def test_directory_outage_is_503_over_http_and_redelivery_on_the_queue(names):
    names.directory.http_status = 503
    try:
        response = names.post({"objectTypeName": "User", "userPrincipalName": "ada@contoso.com"})
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "DirectoryUnavailable"
        text = json.dumps({"objectTypeName": "Group", "displayName": "Finance", "correlationId": "q-outage"})
        names.queue("INTAKE_QUEUE").send_message(text)
        # The queue door asks at least twice (first delivery and a redelivery), refused each time.
        wait_until(lambda: sum(1 for c in names.directory.calls if c["status"] == 503
                               and "Finance" in c["query"].get("$filter", "")) >= 2, timeout=30)
    finally:
        names.directory.http_status = None
    [result] = names.results.wait_for(lambda m: m.get("correlationId") == "q-outage", timeout=60)
    assert result["subject"]["name"] == {"property": "displayName", "value": "Finance"}
    assert names.deadletters.matching(lambda m: "q-outage" in m.get("original", "")) == []


def test_lookup_without_the_permission_names_it(devhost):
    # The shared devhost's identity has only Synchronization.ReadWrite.All, as after a plain deployment.
    response = httpx.post(f"{devhost.url}/api/provision", json={"objectTypeName": "User", "mail": "ada@contoso.com"},
                          timeout=30)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "NameLookupNotPermitted" and "User.Read.All" in error["message"]
    assert "--directory-read" in error["message"]
