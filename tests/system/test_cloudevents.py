"""CloudEvents 1.0 end to end through devhost, Azurite and the Graph simulator: each content mode
reaches Graph and its event travels into the result; a malformed event is refused before anything
is booked; the Event Grid handshake answers."""
from __future__ import annotations

import json
import uuid

import httpx

USER = "5a1e0c6e-3f5b-4c1e-9d7a-0b3c2d1e4f50"


def post(devhost, body, headers) -> httpx.Response:
    return httpx.post(f"{devhost.url}/api/provision", content=json.dumps(body), headers=headers, timeout=30)


def event(id: str, **attributes) -> dict:
    return {"specversion": "1.0", "id": id, "source": "/hr/workday", "type": "com.contoso.hire",
            "subject": f"employee {id}", "data": {"objectId": USER, "objectTypeName": "User"}, **attributes}


def with_event_id(id: str):
    return lambda m: (m.get("event") or {}).get("id") == id


def test_structured_event_reaches_graph_and_its_event_is_in_the_result(devhost, results):
    id = uuid.uuid4().hex
    response = post(devhost, event(id), {"Content-Type": "application/cloudevents+json"})
    assert response.status_code == 202, response.text
    [result] = results.wait_for(with_event_id(id))
    assert result["event"] == {"type": "com.contoso.hire", "subject": f"employee {id}", "source": "/hr/workday", "id": id}
    assert result["result"] == "Success" and result["subject"]["objectId"] == USER


def test_binary_mode_event(devhost, results):
    id = uuid.uuid4().hex
    headers = {"Content-Type": "application/json", "ce-specversion": "1.0", "ce-id": id, "ce-source": "/tickets",
               "ce-type": "com.contoso.ticket.closed"}
    response = post(devhost, {"objectId": USER, "objectTypeName": "User"}, headers)
    assert response.status_code == 202, response.text
    [result] = results.wait_for(with_event_id(id))
    assert result["event"] == {"type": "com.contoso.ticket.closed", "source": "/tickets", "id": id}


def test_batch_gives_each_event_its_own_request_and_result(devhost, results):
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    response = post(devhost, [event(ids[0]), event(ids[1], type="com.contoso.leave")],
                    {"Content-Type": "application/cloudevents-batch+json"})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 2
    first = results.wait_for(with_event_id(ids[0]))[0]
    second = results.wait_for(with_event_id(ids[1]))[0]
    assert (first["event"]["type"], second["event"]["type"]) == ("com.contoso.hire", "com.contoso.leave")
    assert first["requestId"] != second["requestId"]


def test_malformed_event_is_refused_naming_the_attribute_and_nothing_is_called(devhost, sims):
    before = len(sims.graph.calls())
    bad = event(uuid.uuid4().hex)
    bad.pop("source")
    response = post(devhost, [event(uuid.uuid4().hex), bad], {"Content-Type": "application/cloudevents-batch+json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "InvalidCloudEvent" and error["details"][0]["field"] == "[1].source"
    wrong_version = post(devhost, event("x", specversion="0.3"), {"Content-Type": "application/cloudevents+json"})
    assert wrong_version.status_code == 422 and wrong_version.json()["error"]["details"][0]["field"] == "specversion"
    # The whole batch is refused: its good event was not booked either.
    assert len(sims.graph.calls()) == before


def test_event_grid_handshake(devhost):
    response = httpx.options(f"{devhost.url}/api/provision", headers={"WebHook-Request-Origin": "eventgrid.azure.net"},
                             timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    refused = httpx.options(f"{devhost.url}/api/provision", timeout=10)
    assert refused.status_code == 400 and "WebHook-Allowed-Origin" not in refused.headers


def test_operator_cli_sends_a_structured_cloudevent(devhost, results):
    from io import StringIO

    from tools import cli
    id, out = uuid.uuid4().hex, StringIO()
    code = cli.main(["send", "--url", f"{devhost.url}/api/provision", "--data", json.dumps({"objectId": USER,
                     "objectTypeName": "User"}), "--cloudevent-type", "com.contoso.cli", "--cloudevent-source", "/ops",
                     "--cloudevent-id", id, "--cloudevent-subject", "by hand"], out=out)
    assert code == 0, out.getvalue()
    [result] = results.wait_for(with_event_id(id))
    assert result["event"] == {"type": "com.contoso.cli", "subject": "by hand", "source": "/ops", "id": id}
