"""Subjects and applications by name: the Graph requests intake makes, what it caches, and the
errors callers see. Graph is a fake that answers like the directory does; no I/O."""
from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import GraphFailure, RequestRejected
from shared.intake.names import (
    GROUPS,
    USERS,
    NameResolver,
    filter_request,
    odata_string,
)
from shared.intake.rule_discovery import RuleCache
from shared.intake.validation import accept
from shared.models import SubjectName
from shared.settings import Settings

ADA = {"id": "0f7b5a6e-1111-4222-8333-444455556666", "userPrincipalName": "ada@contoso.com", "displayName": "Ada"}
SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"


class FakeGraph:
    """Answers reads from canned answers per (path, $filter); records every read."""

    def __init__(self, answers: dict[tuple[str, str], Any]):
        self.answers = answers
        self.reads: list[tuple[str, dict, dict]] = []

    def token(self) -> str:
        return "t"

    def read(self, path: str, token: str, params=None, headers=None) -> dict:
        self.reads.append((path, dict(params or {}), dict(headers or {})))
        answer = self.answers.get((path, (params or {}).get("$filter", "")), {"value": []})
        if isinstance(answer, GraphFailure):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def settings(**values) -> Settings:
    return Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=SP,
                    DEFAULT_JOB_ID="job1", DEFAULT_RULE_ID="rule1", **values)


def resolver(answers, clock: Clock | None = None, **values) -> tuple[NameResolver, FakeGraph]:
    graph = FakeGraph(answers)
    return NameResolver(graph, RuleCache(600, clock or Clock()), settings(**values)), graph  # type: ignore[arg-type]


def upn(value: str) -> SubjectName:
    return SubjectName(property="userPrincipalName", value=value)


def test_quotes_in_names_are_doubled():
    assert odata_string("o'brien@contoso.com") == "'o''brien@contoso.com'"
    params, headers = filter_request(USERS, "userPrincipalName", "o'brien@contoso.com")
    assert params["$filter"] == "userPrincipalName eq 'o''brien@contoso.com'" and headers == {}


def test_employee_id_is_an_advanced_query():
    params, headers = filter_request(USERS, "employeeId", "E-42")
    assert params["$count"] == "true" and headers == {"ConsistencyLevel": "eventual"}
    plain, _ = filter_request(GROUPS, "displayName", "Sales")
    assert "$count" not in plain


def test_a_unique_user_resolves_and_is_cached_for_the_setting():
    clock = Clock()
    names, graph = resolver({("/v1.0/users", "userPrincipalName eq 'ada@contoso.com'"): {"value": [ADA]}}, clock)
    assert names.object_id("User", upn("ada@contoso.com"), "f") == ADA["id"]
    assert names.object_id("User", upn("ADA@contoso.com"), "f") == ADA["id"]  # Entra compares names case-blind
    assert len(graph.reads) == 1
    clock.now = 601
    names.object_id("User", upn("ada@contoso.com"), "f")
    assert len(graph.reads) == 2


def test_a_miss_is_not_cached_so_a_new_hire_is_found_next_time():
    names, graph = resolver({})
    for _ in range(2):
        with pytest.raises(RequestRejected) as info:
            names.object_id("User", upn("new@contoso.com"), "objectId")
        assert (info.value.status, info.value.info.code) == (422, "NameNotFound")
        assert info.value.info.details == [{"field": "objectId", "property": "userPrincipalName",
                                            "value": "new@contoso.com"}]
    assert len(graph.reads) == 2


def two_groups() -> dict:
    return {("/v1.0/groups", "displayName eq 'Sales'"): {"value": [
        {"id": "g1", "displayName": "Sales", "mailNickname": "sales-eu"},
        {"id": "g2", "displayName": "Sales", "mailNickname": "sales-us"}]}}


def test_an_ambiguous_name_lists_the_candidates():
    names, _ = resolver(two_groups())
    with pytest.raises(RequestRejected) as info:
        names.object_id("Group", SubjectName(property="displayName", value="Sales"), "displayName")
    assert info.value.info.code == "NameAmbiguous"
    assert [c["mailNickname"] for c in info.value.info.details[0]["candidates"]] == ["sales-eu", "sales-us"]


def test_candidates_are_hashed_when_pii_is_redacted():
    names, _ = resolver(two_groups(), REDACT_PII="true", REDACT_PII_SALT="s" * 16)
    with pytest.raises(RequestRejected) as info:
        names.object_id("Group", SubjectName(property="displayName", value="Sales"), "displayName")
    candidates = info.value.info.details[0]["candidates"]
    assert [c["id"] for c in candidates] == ["g1", "g2"]
    assert "sales-eu" not in json.dumps(candidates) and candidates[0]["mailNickname"].startswith("pii:")


@pytest.mark.parametrize("failure,status,code,words", [
    (GraphFailure.of("permanent", "Authorization_RequestDenied", "", 403), 422, "NameLookupNotPermitted",
     "User.Read.All"),
    (GraphFailure.of("transient", "ServiceUnavailable", "", 503, retry_after=7), 503, "DirectoryUnavailable", "later"),
    (GraphFailure.of("transient", "IdentityUnavailable", ""), 503, "DirectoryUnavailable", "later"),
])
def test_graph_failures(failure, status, code, words):
    names, _ = resolver({("/v1.0/users", "userPrincipalName eq 'ada@contoso.com'"): failure})
    with pytest.raises(RequestRejected) as info:
        names.object_id("User", upn("ada@contoso.com"), "f")
    assert (info.value.status, info.value.info.code) == (status, code) and words in info.value.info.message
    if status == 503:
        assert int(info.value.headers["Retry-After"]) >= 1


def test_intake_keeps_the_name_and_the_object_id():
    names, _ = resolver({("/v1.0/users", "mail eq 'ada@contoso.com'"): {"value": [ADA]}})
    [request] = accept(json.dumps({"objectTypeName": "User", "mail": "ada@contoso.com"}), settings(), names=names)
    [item] = request.items
    assert item.subject.objectId == ADA["id"]
    assert item.subject.name == SubjectName(property="mail", value="ada@contoso.com")
    assert item.graph_body()["parameters"][0]["subjects"][0] == {"objectId": ADA["id"], "objectTypeName": "User"}


def test_graph_body_subjects_by_name_name_their_place_in_errors():
    names, _ = resolver({})
    body = {"parameters": [{"ruleId": "r", "subjects": [{"objectTypeName": "Group", "mailNickname": "nobody"}]}]}
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps(body), settings(), names=names)
    assert info.value.info.details[0]["field"] == "parameters[0].subjects[0]"


@pytest.mark.parametrize("subject,words", [
    ({"objectTypeName": "User"}, "exactly one of objectId or userPrincipalName"),
    ({"objectTypeName": "User", "userPrincipalName": "a@b", "mail": "a@b"}, "exactly one"),
    ({"objectTypeName": "User", "mailNickname": "x"}, "mailNickname cannot name"),
    ({"objectTypeName": "Worker", "mail": "x@y"}, "'Worker' needs objectId"),
])
def test_bad_name_combinations_are_refused_without_a_lookup(subject, words):
    names, graph = resolver({})
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps(subject), settings(), names=names)
    assert info.value.status == 422 and words in json.dumps(info.value.info.details)
    assert graph.reads == []


def sp_answers(jobs: list[str]) -> dict:
    return {("/v1.0/servicePrincipals", "displayName eq 'Contoso HR'"): {"value": [{"id": SP, "displayName": "x"}]},
            (f"/v1.0/servicePrincipals/{SP}/synchronization/jobs", ""): {"value": [{"id": j} for j in jobs]}}


def test_application_by_name_resolves_its_only_job():
    names, graph = resolver(sp_answers(["scim.abc"]))
    [request] = accept(json.dumps({"objectTypeName": "User", "objectId": ADA["id"], "application": "Contoso HR"}),
                       settings(), names=names)
    assert (request.items[0].servicePrincipalId, request.items[0].jobId) == (SP, "scim.abc")


def test_application_with_several_jobs_lists_them():
    names, _ = resolver(sp_answers(["scim.a", "scim.b"]))
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps({"objectTypeName": "User", "objectId": ADA["id"], "application": "Contoso HR"}),
               settings(), names=names)
    assert info.value.info.code == "JobNotDetermined"
    assert [c["jobId"] for c in info.value.info.details[0]["candidates"]] == ["scim.a", "scim.b"]


def test_application_by_app_id_filters_on_app_id():
    app_id = "11111111-2222-4333-8444-555555555555"
    names, graph = resolver({("/v1.0/servicePrincipals", f"appId eq '{app_id}'"): {"value": [{"id": SP}]}})
    assert names.service_principal(app_id, "application") == SP


def test_openapi_offers_each_type_only_its_names_and_exactly_one_identifier():
    from shared.operations.openapi import build_spec
    schemas = build_spec(settings())["components"]["schemas"]
    user, group, worker = (schemas[f"CompactEvent_{t}"] for t in ("User", "Group", "Worker"))
    assert {"userPrincipalName", "mail", "employeeId"} <= set(user["properties"]) and "mailNickname" not in user["properties"]
    assert {"mailNickname", "displayName"} <= set(group["properties"]) and "mail" not in group["properties"]
    assert not {"mail", "displayName", "userPrincipalName"} & set(worker["properties"])
    assert user["oneOf"] == [{"required": [p]} for p in ("objectId", "userPrincipalName", "mail", "employeeId")]
    assert "application" in user["properties"] and "callbackUrl" in user["properties"]


def test_a_post_that_needs_too_many_lookups_is_refused_before_it_holds_the_caller_for_minutes():
    from shared.intake.names import MAX_READS_PER_POST
    known = {("/v1.0/users", f"mail eq 'u{i}@contoso.com'"): {"value": [{"id": f"id{i}"}]}
             for i in range(MAX_READS_PER_POST + 1)}
    names, graph = resolver(known)
    body = [{"objectTypeName": "User", "mail": f"u{i}@contoso.com"} for i in range(MAX_READS_PER_POST + 1)]
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps(body), settings(), names=names)
    assert (info.value.status, info.value.info.code) == (413, "TooManyLookups")
    assert len(graph.reads) == MAX_READS_PER_POST
    # The same names again, now cached: no read, no limit.
    again, _ = resolver(known)
    again.cache = names.cache
    assert len(accept(json.dumps(body[:MAX_READS_PER_POST]), settings(), names=again)) == MAX_READS_PER_POST
