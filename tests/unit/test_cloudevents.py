"""CloudEvents 1.0 over HTTP: the three content modes, required attributes, the idempotency key,
and the Event Grid abuse-protection handshake. Pure: no I/O."""
import json

import pytest

from shared.errors import RequestRejected
from shared.intake import cloudevents as ce
from shared.intake.validation import accept
from shared.models import CloudEventRef
from shared.settings import Settings

USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
DATA = {"objectId": USER, "objectTypeName": "User", "ruleId": "r1", "servicePrincipalId": SP, "jobId": "j1"}
STRUCTURED = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
BATCHED = {"Content-Type": "application/cloudevents-batch+json"}


def event(**attributes) -> dict:
    return {"specversion": "1.0", "id": "A-1", "source": "/hr/workday", "type": "com.contoso.hire",
            "subject": "ada", "data": DATA, **attributes}


def rejected(text: str, headers: dict) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        ce.unwrap(text, headers)
    return info.value


def test_structured_event_becomes_one_request_stamped_with_its_event():
    events = ce.unwrap(json.dumps(event()), STRUCTURED)
    settings = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")
    [request] = ce.stamp(accept(ce.data_text(events, STRUCTURED), settings), events)
    [item] = request.items
    assert item.event == CloudEventRef(type="com.contoso.hire", subject="ada", source="/hr/workday", id="A-1")
    assert item.subject.objectId == USER


def test_batch_keeps_order_and_stamps_each_request_with_its_own_event():
    batch = [event(id="1", data=DATA), event(id="2", data=dict(DATA, objectTypeName="Group"))]
    events = ce.unwrap(json.dumps(batch), BATCHED)
    settings = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")
    requests = ce.stamp(accept(ce.data_text(events, BATCHED), settings), events)
    assert [(r.items[0].event.id, r.items[0].subject.objectTypeName) for r in requests] == [("1", "User"), ("2", "Group")]


def test_binary_mode_reads_ce_headers_and_the_body_as_data():
    headers = {"Content-Type": "application/json", "ce-specversion": "1.0", "CE-ID": "B-7", "ce-source": "/tickets",
               "ce-type": "com.contoso.ticket", "ce-subject": "T-42"}
    assert ce.is_cloudevent(headers)
    [got] = ce.unwrap(json.dumps(DATA), headers)
    assert (got.id, got.source, got.type, got.subject, got.data) == ("B-7", "/tickets", "com.contoso.ticket", "T-42", DATA)


def test_plain_json_is_not_a_cloudevent():
    assert not ce.is_cloudevent({"Content-Type": "application/json"})


@pytest.mark.parametrize("missing", ["id", "source", "type", "specversion"])
def test_each_required_attribute_is_named_when_missing(missing):
    body = event()
    body.pop(missing)
    error = rejected(json.dumps(body), STRUCTURED)
    assert (error.status, error.info.code, error.info.details[0]["field"]) == (422, "InvalidCloudEvent", missing)


def test_binary_mode_names_the_missing_header():
    error = rejected(json.dumps(DATA), {"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"})
    assert (error.status, error.info.details[0]["field"]) == (422, "ce-source")


@pytest.mark.parametrize("attributes,field", [
    ({"specversion": "0.3"}, "specversion"),
    ({"id": ""}, "id"),
    ({"source": 5}, "source"),
    ({"data": [DATA]}, "data"),
    ({"data": "text"}, "data"),
    ({"datacontenttype": "text/xml"}, "datacontenttype"),
    ({"data_base64": "e30="}, "data_base64"),
])
def test_malformed_events_name_the_attribute(attributes, field):
    error = rejected(json.dumps(event(**attributes)), STRUCTURED)
    assert (error.status, error.info.details[0]["field"]) == (422, field)


def test_batch_errors_carry_the_index():
    error = rejected(json.dumps([event(), event(type=None)]), BATCHED)
    assert error.info.details[0]["field"] == "[1].type"


@pytest.mark.parametrize("text,status", [("[]", 422), ("{}", 422), ("not json", 400)])
def test_empty_or_unparseable_batches(text, status):
    assert rejected(text, BATCHED).status == status


def test_idempotency_key_is_source_plus_id():
    key = ce.cloudevent_idempotency_key
    a = CloudEventRef(type="t", source="/a", id="1")
    assert key(a) == key(a.model_copy(update={"type": "other", "subject": "x"}))
    assert key(a) != key(a.model_copy(update={"id": "2"}))
    assert key(a) != key(a.model_copy(update={"source": "/b"}))
    # No concatenation collision: ("/a1", "") is another event than ("/a", "1").
    assert key(CloudEventRef(type="t", source="/a1", id="")) != key(a)
    assert key(a).isascii() and len(key(a)) <= 128


def test_handshake_allows_the_origin_that_asks():
    reply = ce.abuse_protection({"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Rate": "120"})
    assert reply.status == 200
    assert reply.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert reply.headers["WebHook-Allowed-Rate"] == "120"


@pytest.mark.parametrize("origin", [None, "", "evil\r\nSet-Cookie: x", "a b"])
def test_handshake_refuses_a_missing_or_malformed_origin(origin):
    reply = ce.abuse_protection({} if origin is None else {"WebHook-Request-Origin": origin})
    assert reply.status == 400 and reply.body["error"]["code"] == "InvalidWebHookRequestOrigin"
    assert "WebHook-Allowed-Origin" not in reply.headers


def test_openapi_describes_the_cloudevents_content_types_and_the_handshake():
    from shared.operations.openapi import build_spec
    spec = build_spec(Settings(AzureWebJobsStorage="UseDevelopmentStorage=true"))
    content = spec["paths"]["/api/provision"]["post"]["requestBody"]["content"]
    assert {"application/json", ce.STRUCTURED, ce.BATCHED} == set(content)
    assert spec["components"]["schemas"]["CloudEvent"]["required"] == ["specversion", "id", "source", "type", "data"]
    assert spec["paths"]["/api/provision"]["options"]["operationId"] == "CloudEventsHandshake"


def post(body: dict | list, headers: dict):
    from shared import handlers
    from tests.fakes import FakeRuntime, no_storage

    rt = FakeRuntime()

    def send(text: str):
        with no_storage():
            return handlers.provision_http(text.encode(), headers, rt)
    return rt, send


@pytest.mark.parametrize("body, headers", [(event(), STRUCTURED), ([event(), event(id="A-2")], BATCHED)])
def test_the_same_event_delivered_again_is_a_replay_of_its_first_answer(body, headers):
    """source + id is the event's Idempotency-Key (shared/handlers.py _key_of): Event Grid and
    webhooks redeliver, and a redelivery must not make a second request."""
    from tests.fakes import queued_calls

    rt, send = post(body, headers)
    first = send(json.dumps(body))
    again = send(json.dumps(body))
    assert first.status == again.status == 202
    assert again.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first.headers
    assert [r["requestId"] for r in again.body["requests"]] == [r["requestId"] for r in first.body["requests"]]
    assert queued_calls(rt, first, again) == len(first.body["requests"])  # nothing queued twice


def test_another_event_from_the_same_source_is_a_new_request():
    rt, send = post(event(), STRUCTURED)
    first = send(json.dumps(event()))
    other = send(json.dumps(event(id="A-2")))
    assert other.status == 202 and "Idempotent-Replayed" not in other.headers
    assert other.body["requests"][0]["requestId"] != first.body["requests"][0]["requestId"]


def test_the_same_id_with_other_data_is_refused_as_a_reused_key():
    rt, send = post(event(), STRUCTURED)
    assert send(json.dumps(event())).status == 202
    changed = send(json.dumps(event(data={**DATA, "objectId": "0" * 8 + USER[8:]})))
    assert changed.status == 422 and changed.body["error"]["code"] == "IdempotencyKeyReused"
