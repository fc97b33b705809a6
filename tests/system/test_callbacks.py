"""Callbacks end to end: devhost and Azurite post each result, signed, to a real HTTPS receiver on
loopback (CALLBACK_ALLOW_LOOPBACK, as in local development; its self-signed certificate is trusted
through SSL_CERT_FILE); the receiver is down, then back; one that always fails ends in a dead letter;
GET /api/provision/{requestId} shows where each callback stands."""
from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from devhost.azurite import free_port
from scripts.local_stack import EXAMPLE_RULE
from shared.intake.signatures import sign
from simulators.logs_ingestion import make_certificate
from tests.conftest import IsolatedHost, module_host, wait_until

SECRET = "callback-test-secret-0123456789"
USER = "3c1e0c6e-3f5b-4c1e-9d7a-0b3c2d1e4f51"


class Receiver:
    """An HTTPS endpoint that records each POST; answers `status` (200 unless told otherwise)."""

    def __init__(self, port: int, cert, key, status: int = 200):
        self.requests: list[dict] = []
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CallbackHost(IsolatedHost):
    def __init__(self, azurite, log_dir):
        self.cert, self.key = make_certificate(log_dir, "127.0.0.1")
        suffix = uuid.uuid4().hex[:8]
        super().__init__(azurite, log_dir, "cb", DEFAULT_RULE_ID=EXAMPLE_RULE, CALLBACK_ALLOWED_HOSTS="127.0.0.1",
                         CALLBACK_ALLOW_LOOPBACK="true", CALLBACK_MAX_ATTEMPTS="3", CALLBACK_QUEUE=f"cb-calls-{suffix}",
                         CALLBACK_TABLE=f"callbacks{suffix}", WEBHOOK_HMAC_SECRET=SECRET, SSL_CERT_FILE=str(self.cert))

    def post(self, body) -> httpx.Response:
        raw = json.dumps(body).encode()
        stamp = str(int(time.time()))
        return httpx.post(f"{self.host.url}/api/provision", content=raw, timeout=30, headers={
            "Content-Type": "application/json", "X-Timestamp": stamp, "X-Signature": sign(SECRET, stamp, raw)})

    def callbacks(self, request_id: str) -> list[dict]:
        response = httpx.get(f"{self.host.url}/api/provision/{request_id}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json().get("callbacks") or []


cb = module_host("cb", CallbackHost)


def accepted_id(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    return response.json()["requests"][0]["requestId"]


def test_receiver_down_then_back_gets_the_signed_result_and_the_status_shows_it(cb):
    port = free_port()
    request_id = accepted_id(cb.post({"objectTypeName": "User", "objectId": USER,
                                      "callbackUrl": f"https://127.0.0.1:{port}/hooks/provisioned?ticket=T-1"}))
    # Down: the first attempt fails and the status says when the next one is due.
    [retrying] = wait_until(lambda: [c for c in cb.callbacks(request_id) if c["state"] == "retrying"])
    assert retrying["host"] == "127.0.0.1" and retrying["attempts"] == 1 and retrying["nextAttemptAt"]
    assert "ticket" not in json.dumps(retrying)
    receiver = Receiver(port, cb.cert, cb.key)
    try:
        [delivery] = wait_until(lambda: receiver.requests)
    finally:
        receiver.stop()
    assert delivery["path"] == "/hooks/provisioned?ticket=T-1"
    result = json.loads(delivery["body"])
    assert result["requestId"] == request_id and result["subject"]["objectId"] == USER and "callbackUrl" not in result
    # Signed as inbound webhooks are: the receiver checks method, its own path and query, and the body.
    assert delivery["headers"]["X-Signature"] == sign(SECRET, delivery["headers"]["X-Timestamp"], delivery["body"],
                                                      "POST", "/hooks/provisioned", {"ticket": "T-1"})
    [state] = wait_until(lambda: [c for c in cb.callbacks(request_id) if c["state"] == "delivered"])
    assert state["attempts"] == 2 and state["lastStatus"] == 200


def test_a_receiver_that_keeps_failing_ends_in_a_dead_letter(cb):
    port = free_port()
    receiver = Receiver(port, cb.cert, cb.key, status=500)
    try:
        request_id = accepted_id(cb.post({"objectTypeName": "User", "objectId": USER,
                                          "callbackUrl": f"https://127.0.0.1:{port}/broken"}))
        [letter] = cb.deadletters.wait_for(lambda m: m.get("source") == "callback" and m.get("requestId") == request_id,
                                           timeout=60)
    finally:
        receiver.stop()
    assert letter["reason"]["code"] == "CallbackFailed" and letter["attempts"] == 3
    assert len(receiver.requests) == 3
    [state] = cb.callbacks(request_id)
    assert state["state"] == "failed" and state["lastStatus"] == 500


@pytest.mark.parametrize("url,words", [
    ("https://hooks.example.com/cb", "not on CALLBACK_ALLOWED_HOSTS"),
    ("http://127.0.0.1:9/cb", "only https"),
])
def test_a_callback_host_not_allowed_is_refused_before_anything_is_booked(cb, url, words):
    before = len(cb.sims.graph.calls())
    response = cb.post({"objectTypeName": "User", "objectId": USER, "callbackUrl": url})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "CallbackUrlRefused" and words in error["message"]
    assert error["details"][0]["field"] == "callbackUrl"
    assert len(cb.sims.graph.calls()) == before
