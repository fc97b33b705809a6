"""Hostile input: whatever arrives over HTTP or on the intake queue gets a clear rejection (a JSON
error, or a dead-letter entry carrying the original), never an unhandled exception. For the queue
that matters most: an exception there is retried five times and parked in -poison without a reason.

The example counts here are the ones RELIABILITY.md reports; change both together."""
from __future__ import annotations

import base64
import json
import string
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared import handlers
from shared.errors import RequestRejected
from shared.graph.client import provision_path
from shared.intake.validation import accept
from shared.models import CompactEvent, GraphBodyEvent, WorkItem
from tests.fakes import SETTINGS, SP, FakeRuntime, no_storage

USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
FIELDS = ["objectId", "objectTypeName", "ruleId", "servicePrincipalId", "jobId", "members", "correlationId",
          "parameters", "subjects", "links", "@odata.type"]
HTTP_STATUSES = {202, 400, 401, 413, 415, 422, 503}

FUZZ = hsettings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> hsettings:
    return hsettings(FUZZ, max_examples=examples)


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6),
                          max_leaves=25)
# Near-miss events: the right keys with values of any type, so validation is exercised, not only parsing.
near_events = st.dictionaries(st.sampled_from(FIELDS), json_value | st.sampled_from(
    ["User", "user", "Group", "Worker", USER, "CN=Ada,DC=corp", "../x", "a%2Fb", "x?y", "x#y", "a\r\nb"]),
    max_size=8)


def run_intake(raw: bytes | str) -> tuple[list[str], list[dict]]:
    rt = FakeRuntime()
    with no_storage():
        work = handlers.intake_message(raw, rt)
    return work, [body for name, body in rt.queues.sent if name == SETTINGS.deadletter_queue]


def assert_clear_outcome(raw: bytes | str) -> None:
    """Accepted (work items, no dead letter) or rejected (exactly one dead letter with a reason
    and the original), and nothing else."""
    work, letters = run_intake(raw)
    if work:
        assert letters == []
        for text in work:
            WorkItem.model_validate_json(text)
        return
    assert len(letters) == 1, "a rejected message must leave exactly one dead letter"
    [letter] = letters
    assert letter["source"] == "intake" and letter["reason"]["code"] and letter["reason"]["message"]
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if letter.get("originalTruncated"):
        assert text.startswith(letter["original"][:1000])
    else:
        assert letter["original"] == text


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# -- queue message bodies ---------------------------------------------------------------------
@fuzz(300)
@given(st.binary(max_size=4096))
def test_random_bytes_on_the_queue_are_dead_lettered_never_raised(raw):
    assert_clear_outcome(raw)


@fuzz(200)
@given(st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "+/=-_ \n", max_size=400),   # bad base64
    st.binary(max_size=512).map(lambda b: base64.b64encode(b).decode()),                # base64 of bytes
    json_value.map(lambda v: base64.b64encode(json.dumps(v).encode()).decode()),        # base64 of any JSON
))
def test_bad_base64_is_dead_lettered_with_a_reason(text):
    assert_clear_outcome(text)


@fuzz(300)
@given(st.one_of(near_events, st.lists(near_events, max_size=4), json_value), st.booleans())
def test_wrong_types_and_near_miss_events_are_accepted_or_dead_lettered(document, as_base64):
    text = json.dumps(document)
    assert_clear_outcome(base64.b64encode(text.encode()).decode() if as_base64 else text)


@fuzz(60)
@given(st.sampled_from([10, 100, 900, 1000, 2000, 5000, 20000, 100000, 500000]),
       st.sampled_from(["array", "object"]), st.sampled_from(["top", "field", "member", "base64"]))
def test_deep_nesting_never_raises_recursion_error(depth, kind, where):
    inner = nested(depth, kind)
    if where == "top":
        text = inner
    elif where == "field":
        text = '{"objectTypeName": "User", "objectId": ' + inner + "}"
    elif where == "member":
        text = '{"objectTypeName": "Group", "objectId": "' + USER + '", "members": [' + inner + "]}"
    else:
        text = base64.b64encode(inner.encode()).decode()
    assert_clear_outcome(text)
    assert_http_is_clear(text.encode())


@pytest.mark.parametrize("raw", [
    b"A" * (1024 * 1024),                                              # 1 MiB of nothing
    json.dumps([{"objectId": USER, "objectTypeName": "User"}] * 5000).encode(),   # too many items
    base64.b64encode(json.dumps({"objectId": "x" * 600_000, "objectTypeName": "Worker"}).encode()),
    json.dumps({"objectTypeName": "Group", "objectId": USER, "members": [USER] * 100_000}).encode(),
    b"\xff\xfe" + "{}".encode("utf-16-le"),                            # UTF-16 with BOM
    b'{"objectTypeName": "user", "objectId": "CN=\\ud800,DC=x"}',      # lone surrogate in a DN
    b"\x00" * 1000,
    json.dumps([{"objectId": "bad\"", "objectTypeName": "User", "jobId": "../"}] * 1000).encode(),
], ids=["1MiB-junk", "5000-items", "600k-objectId-base64", "100k-members", "utf16", "lone-surrogate", "nuls",
        "1000-items-2000-problems"])
def test_huge_and_odd_messages_are_dead_lettered_whole_or_truncated(raw):
    assert_clear_outcome(raw)


def test_a_huge_rejected_message_keeps_a_truncated_original():
    raw = ("#" * (1024 * 1024)).encode()
    work, [letter] = run_intake(raw)
    assert work == [] and letter["originalTruncated"] is True and letter["original"] == "#" * len(letter["original"])


# -- HTTP bodies and the request models ---------------------------------------------------------
def assert_http_is_clear(body: bytes, content_type: str = "application/json") -> None:
    rt = FakeRuntime()
    with no_storage():
        reply = handlers.provision_http(body, {"Content-Type": content_type}, rt)
    assert reply.status in HTTP_STATUSES
    json.loads(reply.json())
    if reply.status >= 400:
        assert set(reply.body) == {"error"} and reply.body["error"]["code"] and reply.body["error"]["message"]


@fuzz(300)
@given(st.one_of(st.binary(max_size=2048), json_value.map(lambda v: json.dumps(v).encode()),
                 st.lists(near_events, max_size=3).map(lambda v: json.dumps(v).encode())),
       st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                        "application/problem+json", "", "application/json; charset=latin-1", "*/*"]))
def test_http_bodies_get_a_json_answer_never_an_exception(body, content_type):
    assert_http_is_clear(body, content_type)


@fuzz(300)
@given(near_events)
def test_models_reject_with_validation_errors_only(document):
    for model in (GraphBodyEvent, CompactEvent):
        try:
            model.model_validate(document)
        except ValueError:   # pydantic's ValidationError is a ValueError
            pass


# -- identifiers that try to leave their place in the URL -------------------------------------
INJECTIONS = ["../", "..", "a/../b", "%2F", "a%2Fb", "a?b=c", "a#b", "a\r\nX-Injected: 1", "a\x00b", "a\tb",
              "a b", "a;b", "a\\b", "..%2F..%2F", "%2e%2e", "a&$filter=x", "\u2215", "a\u0085b"]


# '#' belongs in rule ids (...#V2): a ruleId only travels in the JSON body, never in the URL.
@pytest.mark.parametrize("field,value", [(f, v) for f in ("servicePrincipalId", "jobId", "ruleId") for v in INJECTIONS
                                         if not (f == "ruleId" and v == "a#b")])
def test_identifiers_with_path_or_query_syntax_are_refused(field, value):
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps({"objectId": USER, "objectTypeName": "User", field: value}), SETTINGS)
    assert info.value.status == 422 and info.value.info.details[0]["field"] == field


@pytest.mark.parametrize("type_name,value", [("User", v) for v in INJECTIONS] + [("Worker", v) for v in INJECTIONS]
                         + [("Group", "../" + USER)])
def test_object_ids_with_path_or_query_syntax_are_refused_where_the_form_forbids_them(type_name, value):
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps({"objectId": value, "objectTypeName": type_name}), SETTINGS)
    assert info.value.status == 422


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "\x00", "caf\u00e9", "a\x7fb", "x" * 129])
def test_correlation_ids_outside_printable_ascii_are_refused(value):
    with pytest.raises(RequestRejected) as info:
        accept(json.dumps({"objectId": USER, "objectTypeName": "User", "correlationId": value}), SETTINGS)
    assert info.value.status == 422 and info.value.info.details[0]["field"] == "correlationId"


@fuzz(500)
@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_any_accepted_path_identifier_stays_in_its_segment(sp, job):
    # Even if validation let something through, the path encoding must keep it in one segment.
    path = provision_path("v1.0", sp, job)
    assert "?" not in path and "#" not in path
    segments = path.split("/")
    assert len(segments) == 8 and unquote(segments[3]) == sp and unquote(segments[6]) == job


@fuzz(500)
@given(st.sampled_from(["servicePrincipalId", "jobId", "ruleId"]),
       st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30))
def test_identifiers_the_models_accept_carry_no_url_syntax(field, value):
    try:
        [request] = accept(json.dumps({"objectId": USER, "objectTypeName": "User", field: value}), SETTINGS)
    except RequestRejected:
        return
    accepted = getattr(request.items[0], field)
    assert not set(accepted) & set("/?%\\ ") and accepted.isprintable() and accepted.isascii()
    assert not accepted.startswith(".")


# -- through a devhost: the served OpenAPI description, schemathesis, and what Graph receives ---
import schemathesis  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.system.test_scale_out import Cluster  # noqa: E402

SCHEMATHESIS_EXAMPLES = {"POST": 100, "GET": 25}  # per generation mode; under 60 s in all


@pytest.fixture(scope="module")
def hostile(azurite, tmp_path_factory):
    # Its own queues, lease pool and simulators: schemathesis's accepted requests stay here.
    # One work item at a time: the Graph calls that accepted fuzz cases book must not take the
    # host's threads from the HTTP requests under test.
    c = Cluster(azurite, tmp_path_factory.mktemp("hostile"), hosts=1,
                AzureFunctionsJobHost__extensions__queues__batchSize="1",
                AzureFunctionsJobHost__extensions__queues__newBatchThreshold="0")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def served_schema(hostile):
    return schemathesis.openapi.from_url(f"{hostile.hosts[0].url}/api/openapi.json", timeout=10)


def _post(cluster: Cluster, body: Any) -> httpx.Response:
    return httpx.post(f"{cluster.hosts[0].url}/api/provision", content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=30)


def _graph_call(cluster: Cluster, request_id: str, timeout: float = 60) -> dict:
    cluster.results.wait_for(lambda m: m.get("requestId") == request_id, timeout=timeout)
    [call] = [c for c in cluster.sims.graph.calls() if c.get("client_request_id") == request_id]
    return call


def test_served_description_is_openapi_30_with_operation_ids(hostile):
    response = httpx.get(f"{hostile.hosts[0].url}/api/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    spec = response.json()
    assert spec["openapi"].startswith("3.0.")
    assert spec["servers"] == [{"url": hostile.hosts[0].url}]
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert sorted(ids) == ["CloudEventsHandshake", "Health", "Provision", "RequestStatus"]


@pytest.mark.parametrize("field,value", [("servicePrincipalId", "../" + SP), ("servicePrincipalId", SP + "%2F.."),
                                         ("jobId", "../../users"), ("jobId", "job?$select=x"), ("jobId", "job#x"),
                                         ("jobId", "job%2Fx"), ("ruleId", "r/../x"), ("jobId", "job\r\nX-Evil: 1")])
def test_injected_identifiers_are_refused_at_the_door(hostile, field, value):
    response = _post(hostile, {"objectId": USER, "objectTypeName": "User", field: value})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == field


def test_allowed_odd_identifiers_reach_graph_exactly_where_intended(hostile):
    hostile.warm_up()
    job = "scim.job_v-2..x"   # dots are legal in job ids; ".." inside a segment is no dot-segment
    dn = "CN=a/../b?x=1#frag%2F\\, c,OU=x,DC=corp"   # a DN may hold all of these; it travels in the body
    rule = "33f7c90d-bf71-41b1-bda6-aaf0ddbee5d8#V2"
    response = _post(hostile, {"objectId": dn, "objectTypeName": "user", "jobId": job, "ruleId": rule})
    assert response.status_code == 202, response.text
    [accepted] = response.json()["requests"]
    call = _graph_call(hostile, accepted["requestId"])
    assert call["raw_path"] == f"/v1.0/servicePrincipals/{SP}/synchronization/jobs/{job}/provisionOnDemand"
    assert call["query"] == "" and call["jobId"] == job
    assert call["body"] == {"parameters": [{"ruleId": rule, "subjects": [{"objectId": dn, "objectTypeName": "user"}]}]}


def test_correlation_id_cannot_inject_a_header(hostile):
    refused = _post(hostile, {"objectId": USER, "objectTypeName": "User", "correlationId": "x\r\nX-Injected: 1"})
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["field"] == "correlationId"
    sneaky = "ok X-Injected: 1"
    response = _post(hostile, {"objectId": USER, "objectTypeName": "User", "correlationId": sneaky})
    assert response.status_code == 202
    [accepted] = response.json()["requests"]
    call = _graph_call(hostile, accepted["requestId"])
    assert "x-injected" not in call["headers"]
    assert not [name for name, value in call["headers"].items() if "Injected" in value or "Injected" in name]
    assert call["headers"]["client-request-id"] == accepted["requestId"]


# Last in this module: the bodies it gets accepted book Graph calls that would delay the tests above.
# schemathesis's own pytest loader (from_fixture) does not run under pytest 9, so each operation's
# strategy is driven by hypothesis directly; the checks are schemathesis's.
OPERATIONS = [("/api/provision", "POST"), ("/api/provision/{requestId}", "GET"), ("/api/health", "GET")]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
FOUND: dict[str, int] = {}  # status counts, printed for RELIABILITY.md with -s


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("path,method", OPERATIONS)
def test_schemathesis_no_5xx_and_every_4xx_is_a_json_error(served_schema, path, method, mode):
    operation = served_schema[path][method]
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
              schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]

    @hsettings(max_examples=SCHEMATHESIS_EXAMPLES[method], deadline=None, suppress_health_check=list(HealthCheck),
               database=None)
    @given(operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(timeout=30)
        key = f"{method} {path} {mode.value} {response.status_code}"
        FOUND[key] = FOUND.get(key, 0) + 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body
        if mode is GenerationMode.POSITIVE:
            # Negative cases may be answered with anything documented; positive ones must conform too.
            case.validate_response(response, checks=checks)

    run()
    print(sorted(FOUND.items()))
