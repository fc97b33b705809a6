"""The loopback simulators (Graph provisionOnDemand and the managed identity endpoint) behave as the
real services do in the ways the app depends on. Real azure-identity against the identity
simulator, httpx against Graph."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ManagedIdentityCredential
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.graph.decoding import STATUS_INFO_KEY, decode
from shared.models import GraphKeyValue
from simulators import (
    SIM_CLIENT_ID,
    SIM_OBJECT_ID,
    SIM_TENANT_ID,
    SlidingWindowLimiter,
    TokenError,
    TokenSigner,
    max_in_window,
    start_simulators,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = sorted((ROOT / "simulators" / "golden").glob("example*.json"))
SCOPE = "https://graph.microsoft.com/.default"
SP_ID = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
JOB_ID = "3f7565a3-fde6-4e4d-bda8-1bb70aba3612"


@pytest.fixture
def sims():
    s = start_simulators(seed=1)
    yield s
    s.stop()


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


@pytest.fixture
def mi_env(sims, monkeypatch):
    for name, value in sims.env().items():
        monkeypatch.setenv(name, value)
    for name in ("IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return sims


def pod_url(sims, sp=SP_ID, job=JOB_ID, version="v1.0"):
    return f"{sims.graph_endpoint}/{version}/servicePrincipals/{sp}/synchronization/jobs/{job}/provisionOnDemand"


def user_body(object_id="9f3e2a10-0000-4000-8000-000000000001", type_name="User", rule="rule-1", **subject):
    return {"parameters": [{"ruleId": rule, "subjects": [{"objectId": object_id, "objectTypeName": type_name,
                                                          **subject}]}]}


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def assert_graph_error(response, status, code):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code
    assert err["message"]
    inner = err["innerError"]
    assert set(inner) == {"date", "request-id", "client-request-id"}
    assert inner["request-id"] == response.headers["request-id"]
    uuid.UUID(inner["request-id"])
    return err


# --- managed identity ---------------------------------------------------------------------------

def test_managed_identity_credential_gets_a_graph_token(mi_env):
    sims = mi_env
    cred = ManagedIdentityCredential()
    token = cred.get_token(SCOPE)
    claims = sims.graph.signer.decode(token.token)
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["tid"] == SIM_TENANT_ID
    assert claims["oid"] == SIM_OBJECT_ID
    assert claims["appid"] == SIM_CLIENT_ID
    assert claims["roles"] == ["Synchronization.ReadWrite.All"]
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(token.expires_on - (time.time() + 3600)) < 5
    # MSAL caches the token: a second call does not reach the endpoint.
    assert cred.get_token(SCOPE).token == token.token
    assert sims.identity.stats()["token_requests"] == 1
    request = sims.identity.requests()[0]
    assert request["query"] == {"api-version": "2019-08-01", "resource": "https://graph.microsoft.com"}
    assert request["identity_header"] == "valid" and request["status"] == 200


def test_identity_raw_protocol_and_user_assigned_client_id(sims, client):
    r = client.get(sims.identity_endpoint, params={"api-version": "2019-08-01", "resource": "https://graph.microsoft.us",
                                                   "client_id": "11111111-2222-3333-4444-555555555555"},
                   headers={"X-IDENTITY-HEADER": sims.identity_header})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert isinstance(body["expires_on"], str) and abs(int(body["expires_on"]) - time.time() - 3600) < 5
    assert body["token_type"] == "Bearer" and body["resource"] == "https://graph.microsoft.us"
    assert body["client_id"] == "11111111-2222-3333-4444-555555555555"
    claims = sims.graph.signer.decode(body["access_token"])
    assert claims["aud"] == "https://graph.microsoft.us" and claims["appid"] == body["client_id"]
    # The token has three base64url parts, HS256.
    assert body["access_token"].count(".") == 2


def test_identity_rejects_wrong_or_missing_header(mi_env, monkeypatch, client):
    sims = mi_env
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    with pytest.raises(ClientAuthenticationError):
        ManagedIdentityCredential().get_token(SCOPE)
    params = {"api-version": "2019-08-01", "resource": "https://graph.microsoft.com"}
    missing = client.get(sims.identity_endpoint, params=params)
    assert missing.status_code == 401 and missing.json()["statusCode"] == 401
    stats = sims.identity.stats()
    assert stats["token_requests"] == 2 and stats["tokens_issued"] == 0 and stats["rejected"] == 2


def test_identity_faults_roles_and_counters_via_admin_endpoints(sims, client):
    admin = sims.identity.base_url + "/_sim"
    params = {"api-version": "2019-08-01", "resource": "https://graph.microsoft.com"}
    headers = {"X-IDENTITY-HEADER": sims.identity_header}

    assert client.post(f"{admin}/fault", json={"mode": 503, "count": 2}).status_code == 200
    assert [client.get(sims.identity_endpoint, params=params, headers=headers).status_code
            for _ in range(3)] == [503, 503, 200]

    client.post(f"{admin}/fault", json={"mode": "down", "count": 1})
    with pytest.raises(httpx.TransportError):
        client.get(sims.identity_endpoint, params=params, headers=headers)
    assert client.get(sims.identity_endpoint, params=params, headers=headers).status_code == 200

    client.post(f"{admin}/fault", json={"mode": 500, "seconds": 0.3})
    assert client.get(sims.identity_endpoint, params=params, headers=headers).status_code == 500
    time.sleep(0.35)
    assert client.get(sims.identity_endpoint, params=params, headers=headers).status_code == 200

    client.post(f"{admin}/roles", json={"roles": ["Application.ReadWrite.OwnedBy"]})
    token = client.get(sims.identity_endpoint, params=params, headers=headers).json()["access_token"]
    assert sims.graph.signer.decode(token)["roles"] == ["Application.ReadWrite.OwnedBy"]

    stats = client.get(f"{admin}/stats").json()
    assert stats["token_requests"] == 8 and stats["tokens_issued"] == 4 and stats["faulted"] == 4
    client.post(f"{admin}/reset")
    assert client.get(f"{admin}/stats").json()["token_requests"] == 0


def test_identity_python_controls(mi_env, client):
    sims = mi_env
    params = {"api-version": "2019-08-01", "resource": "https://graph.microsoft.com"}
    headers = {"X-IDENTITY-HEADER": sims.identity_header}
    sims.identity.fail("503")  # until recover()
    assert [client.get(sims.identity_endpoint, params=params, headers=headers).status_code
            for _ in range(3)] == [503, 503, 503]
    assert sims.identity.fault["mode"] == "503"
    sims.identity.recover()
    assert sims.identity.fault is None
    # A transient fault: the credential retries and gets a token.
    sims.identity.fail("down", count=1)
    assert ManagedIdentityCredential().get_token(SCOPE).token
    assert sims.identity.stats()["faulted"] == 4
    sims.identity.set_roles([])
    token = ManagedIdentityCredential().get_token(SCOPE).token
    assert sims.graph.signer.decode(token)["roles"] == []
    with pytest.raises(ValueError):
        sims.identity.fail("418")


# --- Graph: golden and generated answers --------------------------------------------------------

@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_examples_are_served_exactly(sims, client, path):
    golden = json.loads(path.read_text(encoding="utf-8"))
    url = golden["url"].replace("https://graph.microsoft.com", sims.graph_endpoint)
    r = client.post(url, json=golden["request"],
                    headers={**auth(sims.mint_token()), "client-request-id": "c0ffee00-0000-4000-8000-000000000001"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["client-request-id"] == "c0ffee00-0000-4000-8000-000000000001"
    uuid.UUID(r.headers["request-id"])
    body = r.json()
    assert body == golden["response"]
    for name in ("@odata.context", "key", "value"):
        assert body[name] == golden["response"][name]  # the JSON strings character for character
    call = sims.graph.calls()[-1]
    assert (call["servicePrincipalId"], call["jobId"]) == (golden["servicePrincipalId"], golden["jobId"])


@pytest.mark.parametrize("type_name,object_id,systems", [
    ("User", "0a1b2c3d-0000-4000-8000-00000000000a", ("Azure Active Directory", "customappsso")),
    ("user", "CN=Jane Roe,OU=Staff,DC=corp,DC=contoso,DC=com", ("Active Directory", "Azure Active Directory")),
    ("Worker", "21004", ("Workday", "Active Directory")),
    ("Group", "0a1b2c3d-0000-4000-8000-00000000000b", ("Azure Active Directory", "customappsso")),
])
def test_generated_success_is_json_in_strings(sims, client, type_name, object_id, systems):
    r = client.post(pod_url(sims, version="beta"), json=user_body(object_id, type_name), headers=auth(sims.mint_token()))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"@odata.context", "key", "value"}
    assert body["@odata.context"] == "https://graph.microsoft.com/beta/$metadata#microsoft.graph.stringKeyStringValuePair"
    assert isinstance(body["key"], str) and isinstance(body["value"], str)
    assert json.loads(body["key"]) == {"result": "Success", "details": {}}
    value = json.loads(body["value"])
    assert value["action"] == "Create"
    uuid.UUID(value["changeId"])
    assert value["startTime"] <= value["endTime"] and value["endTime"].endswith("Z")
    assert [(s["name"], s["type"]) for s in value["provisioningSteps"]] == [
        ("EntryImport", "Import"), ("EntryImport", "Matching"),
        ("EntrySynchronizationScoping", "Scoping"), ("EntryExportAdd", "Export")]
    for step in value["provisioningSteps"]:
        assert set(step) == {"name", "type", "status", "description", "timestamp", "details"}
        assert step["status"] == "Success"
    assert value["modifiedProperties"] and all(set(p) == {"displayName", "oldValue", "newValue"}
                                               for p in value["modifiedProperties"])
    assert value["statusInfo"]["status"] == "Success"
    assert value["reportableIdentifier"]
    for side in ("sourceIdentity", "targetIdentity"):
        assert set(value[side]) == {"id", "type", "displayName", "details"}
    assert value["sourceIdentity"]["type"] == type_name
    assert (value["sourceSystem"]["name"], value["targetSystem"]["name"]) == systems
    for side in ("sourceSystem", "targetSystem"):
        assert set(value[side]) == {"id", "name", "details"}


def test_group_with_members_gets_empty_value(sims, client):
    members = [{"objectId": f"m{i}", "objectTypeName": "User"} for i in range(5)]
    r = client.post(pod_url(sims), json=user_body("grp-1", "Group", links={"members": members}),
                    headers=auth(sims.mint_token()))
    assert r.status_code == 200
    assert json.loads(r.json()["key"]) == {"result": "Success", "details": {}}
    assert r.json()["value"] == "{}"


def test_a_cross_tenant_job_answers_in_the_statusinfo_shape(sims, client):
    sims.graph.set_job(SP_ID, JOB_ID, template_id="Azure2Azure")
    r = client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token()))
    assert r.status_code == 200 and r.json()["key"] == STATUS_INFO_KEY
    [entry] = json.loads(r.json()["value"])
    assert [s["name"] for s in entry["provisioningSteps"]][-1] == "EntryExportAdd"
    outcome = decode(GraphKeyValue.model_validate(r.json()))
    assert (outcome.answerShape, outcome.result, outcome.verdict) == ("statusInfo", "Success", "created")
    # Another job keeps the documented shape.
    other = client.post(pod_url(sims, job="other-job"), json=user_body(), headers=auth(sims.mint_token()))
    assert json.loads(other.json()["key"])["result"] == "Success"


def test_a_subject_out_of_scope_is_skipped_until_its_assignment_applies(sims, client):
    admin = sims.graph.base_url + "/_sim/out_of_scope"
    assert client.post(admin, json={"objectId": "9f3e2a10-0000-4000-8000-000000000001", "calls": 2}).json() == {
        "9f3e2a10-0000-4000-8000-000000000001": 2}
    answers = [client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token())).json() for _ in range(3)]
    keys = [json.loads(a["key"]) for a in answers]
    assert [k["result"] for k in keys] == ["Skipped", "Skipped", "Success"]
    assert keys[0]["details"] == {"errorCode": "NotEffectivelyEntitled"}
    assert [decode(GraphKeyValue.model_validate(a)).verdict for a in answers] == ["outOfScope", "outOfScope", "created"]
    assert client.get(admin).json() == {}
    # In the StatusInfo shape the skip is a step with its SkipReason.
    sims.graph.set_job(SP_ID, JOB_ID, template_id="Azure2Azure")
    sims.graph.set_out_of_scope("9f3e2a10-0000-4000-8000-000000000001")
    skipped = client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token())).json()
    outcome = decode(GraphKeyValue.model_validate(skipped))
    assert (outcome.answerShape, outcome.verdict, outcome.reasonCode) == ("statusInfo", "outOfScope",
                                                                          "NotEffectivelyEntitled")


def test_owned_by_without_owning_the_service_principal_is_401_unknown_error_with_empty_message(sims, client):
    owned_by = sims.mint_token(roles=["Application.ReadWrite.OwnedBy"])
    assert client.post(pod_url(sims), json=user_body(), headers=auth(owned_by)).status_code == 200  # no owners set
    client.post(sims.graph.base_url + "/_sim/owners", json={"servicePrincipalId": SP_ID, "owners": ["someone-else"]})
    r = client.post(pod_url(sims), json=user_body(), headers=auth(owned_by))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "UnknownError" and r.json()["error"]["message"] == ""
    # Synchronization.ReadWrite.All does not depend on ownership; an owner's OwnedBy token works.
    assert client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token())).status_code == 200
    sims.graph.set_owners(SP_ID, [SIM_OBJECT_ID])
    assert client.post(pod_url(sims), json=user_body(), headers=auth(owned_by)).status_code == 200


BOSS = {"objectId": "0b3e6b3c-2a54-4f6e-9a49-1d0c7a1f2b01", "objectTypeName": "User"}


def test_links_manager_and_owners_are_accepted_and_recorded(sims, client):
    bodies = [user_body(links={"manager": BOSS}), user_body("grp-1", "Group", links={"owners": [BOSS]})]
    for body in bodies:
        assert client.post(pod_url(sims), json=body, headers=auth(sims.mint_token())).status_code == 200
    assert [c["body"] for c in sims.graph.calls()] == bodies


@pytest.mark.parametrize("links,code", [
    ({"manager": [BOSS]}, "BadRequest"),
    ({"owners": BOSS}, "BadRequest"),
    ({"owners": [{"objectTypeName": "User"}]}, "RequestParameterInvalid"),
    ({"manager": {"objectId": "", "objectTypeName": "User"}}, "RequestParameterInvalid"),
    ({"manager": dict(BOSS, title="CEO")}, "BadRequest"),
    ({"admins": [BOSS]}, "BadRequest"),
    ("manager", "BadRequest"),
])
def test_malformed_links_are_400_like_graph(sims, client, links, code):
    r = client.post(pod_url(sims), json=user_body(links=links), headers=auth(sims.mint_token()))
    assert_graph_error(r, 400, code)


# --- Graph: authentication, authorization, validation -------------------------------------------

def test_401_for_missing_bad_foreign_expired_or_wrong_audience_tokens(sims, client):
    good = sims.mint_token()
    other_key = TokenSigner().mint()
    expired = sims.mint_token(iat=int(time.time()) - 7200, lifetime=3600)
    wrong_aud = sims.mint_token("https://management.azure.com/")
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwdw=="},
             auth("not-a-jwt"), auth(other_key), auth(expired), auth(wrong_aud), auth(tampered)]
    for headers in cases:
        r = client.post(pod_url(sims), json=user_body(), headers=headers)
        assert_graph_error(r, 401, "InvalidAuthenticationToken")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert "expired" in client.post(pod_url(sims), json=user_body(), headers=auth(expired)).json()["error"]["message"]
    # Authentication failures do not count toward the rate window: 5 good calls still pass.
    assert [client.post(pod_url(sims), json=user_body(), headers=auth(good)).status_code
            for _ in range(5)] == [200] * 5
    assert sims.graph.max_in_window(counted_only=True) == 5


def test_all_three_graph_clouds_are_accepted(sims, client):
    for aud in ("https://graph.microsoft.com", "https://graph.microsoft.us", "https://dod-graph.microsoft.us"):
        r = client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token(aud + "/.default")))
        assert r.status_code == 200, aud
    assert r.json()["@odata.context"].startswith("https://dod-graph.microsoft.us/v1.0/")


def test_403_without_a_provisioning_role(sims, client, mi_env):
    for roles in ([], ["User.Read.All", "Directory.Read.All"]):
        r = client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token(roles=roles)))
        assert_graph_error(r, 403, "Authorization_RequestDenied")
    ok = client.post(pod_url(sims), json=user_body(),
                     headers=auth(sims.mint_token(roles=["Application.ReadWrite.OwnedBy"])))
    assert ok.status_code == 200
    # Through the real credential, after the identity's roles change.
    sims.identity.set_roles(["Group.Read.All"])
    token = ManagedIdentityCredential().get_token(SCOPE).token
    assert_graph_error(client.post(pod_url(sims), json=user_body(), headers=auth(token)), 403,
                       "Authorization_RequestDenied")


@pytest.mark.parametrize("body,code", [
    (user_body(rule=""), "RequestParameterInvalid"),
    (user_body(rule="   "), "RequestParameterInvalid"),
    ({"parameters": [{"subjects": [{"objectId": "u1", "objectTypeName": "User"}]}]}, "RequestParameterInvalid"),
    ({"parameters": [{"ruleId": "r", "subjects": []}]}, "RequestParameterInvalid"),
    (user_body(object_id=""), "RequestParameterInvalid"),
    ({"parameters": [{"ruleId": "r", "subjects": [{"objectId": "u1"}]}]}, "RequestParameterInvalid"),
    (user_body("g1", "Group", links={"members": [{"objectId": f"m{i}", "objectTypeName": "User"}
                                                 for i in range(6)]}), "BadRequest"),
    ({"parameters": [{"ruleId": "r", "subjects": [{"objectId": "g1", "objectTypeName": "Group"},
                                                  {"objectId": "g2", "objectTypeName": "Group"}]}]}, "BadRequest"),
    ({"parameters": [{"ruleID": "r", "subjects": [{"objectId": "u1", "objectTypeName": "User"}]}]}, "BadRequest"),
    ({"parameters": "nope"}, "BadRequest"),
    ({}, "BadRequest"),
])
def test_400_for_invalid_bodies(sims, client, body, code):
    r = client.post(pod_url(sims), json=body, headers=auth(sims.mint_token()))
    err = assert_graph_error(r, 400, code)
    if code == "BadRequest" and "members" in json.dumps(body) and "6" not in err["message"]:
        pytest.fail(err["message"])


def test_400_for_bad_json(sims, client):
    r = client.post(pod_url(sims), content=b'{"parameters": [', headers={
        **auth(sims.mint_token()), "Content-Type": "application/json"})
    assert_graph_error(r, 400, "BadRequest")
    call = sims.graph.calls()[-1]
    assert call["body"] is None and call["raw_body"] == '{"parameters": ['


def test_unknown_paths_and_methods(sims, client):
    token = sims.mint_token()
    r = client.post(pod_url(sims, version="v2.0"), json=user_body(), headers=auth(token))
    assert_graph_error(r, 404, "Request_ResourceNotFound")
    r = client.get(pod_url(sims), headers=auth(token))
    assert_graph_error(r, 405, "Request_BadRequest")
    assert [c["status"] for c in sims.graph.calls()] == [404, 405]


# --- Graph: rate limiting ----------------------------------------------------------------------

def test_rate_limit_429_with_retry_after(sims, client):
    sims.graph.configure(rate_calls=5, rate_window=1.0)
    headers = auth(sims.mint_token())
    statuses = [client.post(pod_url(sims), json=user_body(), headers=headers) for _ in range(7)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429] * 2
    throttled = statuses[5]
    assert_graph_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["retry-after"] == "1"  # int seconds until a slot frees
    stats = sims.graph.stats()
    assert stats["throttled"] == 2 and stats["calls"] == 7
    # Throttled arrivals count by default; once the window has passed, calls succeed again.
    time.sleep(int(throttled.headers["retry-after"]) + 0.05)
    assert client.post(pod_url(sims), json=user_body(), headers=headers).status_code == 200


def test_rate_limit_holds_under_concurrency(sims):
    sims.graph.configure(rate="5/10", latency="0.05-0.1")
    headers = auth(sims.mint_token())

    def call(_):
        with httpx.Client(timeout=10) as c:
            return c.post(pod_url(sims), json=user_body(), headers=headers)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(call, range(12)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 5 + [429] * 7
    for r in results:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 10
    assert sims.graph.max_in_window(10) == 12
    assert sum(1 for c in sims.graph.calls() if c["status"] == 200) == 5


def test_count_throttled_option_via_admin(sims, client):
    """With counting on, a client that keeps calling while throttled stays throttled; with it off,
    the window frees one `rate_window` after the admitted call."""
    admin = f"{sims.graph_endpoint}/_sim"
    headers = auth(sims.mint_token())
    for count_throttled, expected in ((True, 429), (False, 200)):
        client.delete(f"{admin}/calls")
        cfg = client.post(f"{admin}/config", json={"rate": "1/0.6", "count_throttled": count_throttled}).json()
        assert cfg["rate_calls"] == 1 and cfg["rate_window"] == 0.6 and cfg["count_throttled"] is count_throttled
        codes = [client.post(pod_url(sims), json=user_body(), headers=headers).status_code]
        time.sleep(0.4)
        codes.append(client.post(pod_url(sims), json=user_body(), headers=headers).status_code)  # throttled at 0.4 s
        time.sleep(0.35)  # 0.75 s: the admitted call has left the window; the throttled one has not
        codes.append(client.post(pod_url(sims), json=user_body(), headers=headers).status_code)
        assert codes == [200, 429, expected], count_throttled


def test_limiter_retry_after_is_exact():
    lim = SlidingWindowLimiter(calls=5, window=10, count_throttled=True)
    for t in (0, 1, 2, 3, 4):
        assert lim.admit("t", t, now=t)[0]
    # This throttled arrival counts too, so a slot frees when the arrival at 1 leaves: at 11.
    assert lim.admit("t", 4.5, now=4.5) == (False, 7, True)
    assert lim.admit("t", 9.9, now=9.9) == (False, 3, True)  # now the one at 2 must leave: 12
    assert lim.admit("t", 11.5, now=11.5)[0] is False  # hammering keeps you throttled
    assert lim.admit("t", 25.0, now=25.0)[0] is True
    lim2 = SlidingWindowLimiter(calls=5, window=10, count_throttled=False)
    for t in (0, 1, 2, 3, 4, 4.5, 9.9):
        lim2.admit("t", t, now=t)
    assert lim2.admit("t", 10.0, now=10.0)[0] is True


# --- sliding-window helper ---------------------------------------------------------------------

def test_max_in_window_examples(sims, client):
    assert max_in_window([], 10) == 0
    assert max_in_window([0, 0.5, 1.0, 1.5], 1.0) == 2  # half-open windows
    assert max_in_window([5, 0, 9.99, 10, 1], 10) == 4
    sims.graph.configure(rate_calls=0)  # unlimited
    headers = auth(sims.mint_token())
    for _ in range(7):
        client.post(pod_url(sims), json=user_body(), headers=headers)
    assert sims.graph.max_in_window(10) == 7
    r = client.get(f"{sims.graph_endpoint}/_sim/max_in_window", params={"window": 10})
    assert r.json()["max_in_window"] == 7
    assert client.get(f"{sims.graph_endpoint}/_sim/stats").json()["max_in_window"] == 7


times_st = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=40)


@settings(max_examples=200, deadline=None)
@given(times=times_st, window=st.floats(min_value=0.01, max_value=30))
def test_max_in_window_matches_brute_force(times, window):
    brute = max((sum(1 for u in times if s <= u < s + window) for s in times), default=0)
    assert max_in_window(times, window) == brute


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(min_value=0, max_value=3, allow_nan=False), min_size=1, max_size=40),
       calls=st.integers(min_value=1, max_value=6), count_throttled=st.booleans())
def test_limiter_never_admits_more_than_the_limit(gaps, calls, count_throttled):
    lim = SlidingWindowLimiter(calls=calls, window=10, count_throttled=count_throttled)
    t = 0.0
    admitted = []
    last = None
    for gap in gaps:
        t += gap
        ok, retry, counted = lim.admit("tenant", t, now=t)
        assert counted or not count_throttled
        if ok:
            admitted.append(t)
        else:
            last = (t, retry)
    assert max_in_window(admitted, 10) <= calls
    if last is not None and last[0] == t:  # waiting Retry-After after the last 429 gets a slot
        assert lim.admit("tenant", t + last[1], now=t + last[1])[0]


# --- fault script ------------------------------------------------------------------------------

def test_fault_script_503_then_200(sims, client):
    oid = "5c1d2e3f-0000-4000-8000-0000000000aa"
    sims.graph.script(oid, {"status": 503, "headers": {"Retry-After": "2"}}, {"status": 200})
    headers = auth(sims.mint_token())
    first = client.post(pod_url(sims), json=user_body(oid), headers=headers)
    assert_graph_error(first, 503, "ServiceUnavailable")
    assert first.headers["retry-after"] == "2"
    second = client.post(pod_url(sims), json=user_body(oid), headers=headers)
    assert second.status_code == 200 and json.loads(second.json()["key"])["result"] == "Success"
    assert sims.graph.pending_script() == {}
    calls = sims.graph.calls()
    assert [c["scripted"] for c in calls] == [True, True]
    assert all(c["counted"] for c in calls)  # scripted answers are arrivals for the rate window
    # Other objectIds are unaffected.
    assert client.post(pod_url(sims), json=user_body("other"), headers=headers).status_code == 200


def test_fault_script_reset_drops_the_connection(sims, client):
    sims.graph.script("*", {"reset": True, "delay": 0.05})
    with pytest.raises(httpx.TransportError):
        client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token()))
    call = sims.graph.calls()[-1]
    assert call["reset"] is True and call["status"] is None
    assert client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token())).status_code == 200


def test_fault_script_raw_key_and_body_via_admin(sims, client):
    admin = f"{sims.graph_endpoint}/_sim/script"
    raw_key = "Microsoft.Identity.Health.Common.ProvisioningException: something went wrong"
    r = client.post(admin, json={"objectId": "u-raw", "answers": [
        {"status": 200, "key": raw_key, "value": "not json either"},
        {"status": 502, "body": "<html>Bad gateway</html>", "headers": {"Content-Type": "text/html"}},
        {"status": 429},
    ]})
    assert len(r.json()["u-raw"]) == 3
    headers = auth(sims.mint_token())
    first = client.post(pod_url(sims), json=user_body("u-raw"), headers=headers)
    assert first.status_code == 200 and first.json()["key"] == raw_key
    assert first.json()["value"] == "not json either"
    with pytest.raises(ValueError):
        json.loads(first.json()["key"])
    second = client.post(pod_url(sims), json=user_body("u-raw"), headers=headers)
    assert second.status_code == 502 and second.text == "<html>Bad gateway</html>"
    assert second.headers["content-type"] == "text/html"
    third = client.post(pod_url(sims), json=user_body("u-raw"), headers=headers)
    assert_graph_error(third, 429, "TooManyRequests")
    assert "retry-after" not in third.headers  # scripted 429 without Retry-After: client must back off
    assert client.delete(admin).json() == {}


# --- call log ----------------------------------------------------------------------------------

def test_call_log_redacts_authorization_and_records_raw_and_decoded_path(sims, client):
    token = sims.mint_token()
    nasty_sp = "a/../b?x=1#frag %"
    nasty_job = "Workday.Users:e0a9"
    url = (f"{sims.graph_endpoint}/beta/servicePrincipals/{quote(nasty_sp, safe='')}"
           f"/synchronization/jobs/{quote(nasty_job, safe='')}/provisionOnDemand")
    r = client.post(url, json=user_body(), headers={**auth(token), "client-request-id": "abc-123"},
                    params={"trace": "1"})
    assert r.status_code == 200 and r.headers["client-request-id"] == "abc-123"
    calls = client.get(f"{sims.graph_endpoint}/_sim/calls").json()
    assert len(calls) == 1
    call = calls[0]
    assert token not in json.dumps(calls) and token.split(".")[2] not in json.dumps(calls)
    assert call["headers"]["authorization"] == "Bearer <redacted>"
    assert call["raw_path"] == ("/beta/servicePrincipals/a%2F..%2Fb%3Fx%3D1%23frag%20%25"
                                "/synchronization/jobs/Workday.Users%3Ae0a9/provisionOnDemand")
    assert (call["version"], call["servicePrincipalId"], call["jobId"]) == ("beta", nasty_sp, nasty_job)
    assert call["query"] == "trace=1"
    assert call["body"] == user_body() and call["objectId"] == user_body()["parameters"][0]["subjects"][0]["objectId"]
    assert call["method"] == "POST" and call["status"] == 200 and call["tid"] == SIM_TENANT_ID
    assert call["client_request_id"] == "abc-123" and call["request_id"] == r.headers["request-id"]
    assert isinstance(call["arrival"], float) and abs(call["wall_time"] - time.time()) < 5
    # An unencoded slash changes the path: it is not the provisionOnDemand route.
    bad = client.post(f"{sims.graph_endpoint}/beta/servicePrincipals/a/b/synchronization/jobs/j/provisionOnDemand",
                      json=user_body(), headers=auth(token))
    assert bad.status_code == 404 and sims.graph.calls()[-1]["route"] is None
    client.delete(f"{sims.graph_endpoint}/_sim/calls")
    assert sims.graph.calls() == [] and sims.graph.stats()["calls"] == 0


def test_latency_is_applied(sims, client):
    client.post(f"{sims.graph_endpoint}/_sim/config", json={"latency": "0.2-0.3"})
    t0 = time.monotonic()
    r = client.post(pod_url(sims), json=user_body(), headers=auth(sims.mint_token()))
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and 0.2 <= elapsed < 1.5
    assert sims.graph.config()["latency"] == [0.2, 0.3]


def test_token_signer_rejects_tampering():
    signer = TokenSigner(b"k" * 32)
    token = signer.mint(roles=["A"])
    assert signer.decode(token)["roles"] == ["A"]
    with pytest.raises(TokenError):
        TokenSigner(b"x" * 32).decode(token)
    with pytest.raises(TokenError):
        signer.decode(token, audiences={"https://graph.microsoft.us"})


# --- subprocess mode ---------------------------------------------------------------------------

def test_subprocess_mode_prints_env_and_serves(client):
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators", "--rate", "5/1", "--latency", "0-0.01", "--roles",
         "Application.ReadWrite.OwnedBy", "--identity-header", "s3cret"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        got = []
        deadline = time.monotonic() + 15
        while not got or got[-1] != "Simulators ready":
            got.append(lines.get(timeout=max(0.1, deadline - time.monotonic())).rstrip("\n"))
        env = dict(line.split("=", 1) for line in got[:-1])
        assert list(env) == ["GRAPH_ENDPOINT", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"]
        assert env["GRAPH_ENDPOINT"].startswith("http://127.0.0.1:") and env["GRAPH_ENDPOINT"].count("/") == 2
        assert env["IDENTITY_ENDPOINT"].startswith("http://127.0.0.1:") and env["IDENTITY_ENDPOINT"].endswith("/msi/token")
        assert env["IDENTITY_HEADER"] == "s3cret"
        token = client.get(env["IDENTITY_ENDPOINT"], params={"api-version": "2019-08-01",
                                                             "resource": "https://graph.microsoft.com"},
                           headers={"X-IDENTITY-HEADER": "s3cret"}).json()["access_token"]
        r = client.post(f"{env['GRAPH_ENDPOINT']}/v1.0/servicePrincipals/s/synchronization/jobs/j/provisionOnDemand",
                        json=user_body(), headers=auth(token))
        assert r.status_code == 200
        config = client.get(f"{env['GRAPH_ENDPOINT']}/_sim/config").json()
        assert (config["rate_calls"], config["rate_window"]) == (5, 1.0)
        stats = client.get(f"{env['GRAPH_ENDPOINT']}/_sim/stats").json()
        assert stats["calls"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read()
