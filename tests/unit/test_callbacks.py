"""Callbacks: which URLs may be called back, and what one delivery attempt does for each answer.
The receiver is an httpx MockTransport and DNS a function: no I/O."""
from __future__ import annotations

import json
import socket
from datetime import datetime, timezone

import httpx
import pytest

from shared.errors import RequestRejected
from shared.intake.signatures import sign
from shared.models import CallbackMessage, CallbackState, ResultMessage, Subject
from shared.results import callbacks
from shared.settings import Settings

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
SECRET = "s3cret-s3cret-s3cret"


def settings(**values) -> Settings:
    base = {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "CALLBACK_ALLOWED_HOSTS": "hooks.contoso.com,*.tickets.example",
            "WEBHOOK_HMAC_SECRET": SECRET, "CALLBACK_MAX_ATTEMPTS": "3", "RETRY_BASE_SECONDS": "4"}
    return Settings(**{**base, **values})


def resolver(*addresses: str):
    def resolve(host, port, type=0):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in addresses]
    return resolve


def refusal(url: str, resolve=resolver("20.50.2.1"), **values) -> str:
    with pytest.raises(RequestRejected) as info:
        callbacks.check_url(url, settings(**values), resolve=resolve)
    assert (info.value.status, info.value.info.code) == (422, "CallbackUrlRefused")
    return info.value.info.message


def test_an_allowed_https_host_with_public_addresses_passes():
    assert callbacks.check_url("https://hooks.contoso.com/cb?x=1", settings(), resolve=resolver("20.50.2.1")) == \
        ("hooks.contoso.com", "20.50.2.1")
    assert callbacks.check_url("https://a.b.tickets.example/", settings(), resolve=resolver("2603:1030::1")) == \
        ("a.b.tickets.example", "2603:1030::1")


@pytest.mark.parametrize("url,words", [
    ("http://hooks.contoso.com/cb", "only https"),
    ("https://evil.example.com/cb", "not on CALLBACK_ALLOWED_HOSTS"),
    ("https://tickets.example.evil.com/", "not on CALLBACK_ALLOWED_HOSTS"),
    ("https://user:pw@hooks.contoso.com/", "user information"),
    ("https://hooks.contoso.com:99999/", "not a valid URL"),
])
def test_scheme_host_and_form(url, words):
    assert words in refusal(url)


@pytest.mark.parametrize("address,words", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "not a public"), ("192.168.0.9", "not a public"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("::ffff:10.0.0.1", "not a public"),
    ("0.0.0.0", "not a public"), ("100.64.0.1", "not a public"),
])
def test_every_non_public_address_is_refused(address, words):
    # One bad address among good ones is enough: a client may connect to any of them.
    assert words in refusal("https://hooks.contoso.com/", resolve=resolver("20.50.2.1", address))


def test_loopback_only_with_the_development_setting():
    ok = settings(CALLBACK_ALLOW_LOOPBACK="true", CALLBACK_ALLOWED_HOSTS="127.0.0.1")
    assert callbacks.check_url("https://127.0.0.1:8443/cb", ok, resolve=resolver("127.0.0.1"))[0] == "127.0.0.1"
    assert "not a public" in refusal("https://hooks.contoso.com/", resolve=resolver("10.0.0.1"),
                                     CALLBACK_ALLOW_LOOPBACK="true")


def test_callbacks_are_off_without_allowed_hosts_and_unresolvable_hosts_are_refused():
    assert "not enabled" in refusal("https://hooks.contoso.com/", CALLBACK_ALLOWED_HOSTS="")

    def nxdomain(host, port, type=0):
        raise socket.gaierror("Name or service not known")
    assert "does not resolve" in refusal("https://hooks.contoso.com/", resolve=nxdomain)


# -- delivery ------------------------------------------------------------------------------------
class Queues:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, int]] = []

    def send_json(self, name, body, *, delay=0):
        self.sent.append((name, json.loads(body.model_dump_json()) if hasattr(body, "model_dump_json") else body, delay))


class Ledger:
    def __init__(self) -> None:
        self.states: list[CallbackState] = []

    def record(self, request_id, state):
        self.states.append(state)


def message(attempts: int = 0) -> str:
    return CallbackMessage(url="https://hooks.contoso.com/cb?token=abc", resultId="r:0", requestId="r",
                           result='{"resultId":"r:0"}', attempts=attempts).model_dump_json()


def deliver(answer, attempts: int = 0, **values):
    queues, ledger, seen = Queues(), Ledger(), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)
    client = httpx.Client(transport=httpx.MockTransport(handle), follow_redirects=False)
    callbacks.deliver(message(attempts), queues, ledger, settings(**values), client, resolve=resolver("20.50.2.1"))
    return queues, ledger, seen


def test_a_delivery_goes_to_the_checked_address_with_the_host_for_tls_and_http():
    # A DNS answer that changes after the check (rebinding) is never used for the connection.
    _, _, [request] = deliver(lambda r: httpx.Response(204))
    assert request.url.host == "20.50.2.1" and request.url.port in (None, 443)
    assert request.url.raw_path == b"/cb?token=abc"
    assert request.headers["Host"] == "hooks.contoso.com" and request.extensions["sni_hostname"] == "hooks.contoso.com"


def test_a_delivery_is_signed_like_an_inbound_webhook():
    queues, ledger, [request] = deliver(lambda r: httpx.Response(204))
    body = request.read()
    assert body == b'{"resultId":"r:0"}'
    # Over the receiver's own method, path and query (docs/security.md's canonical string), so a
    # receiver checks it exactly as this app checks inbound webhooks.
    assert request.headers["X-Signature"] == sign(SECRET, request.headers["X-Timestamp"], body, "POST", "/cb",
                                                  {"token": "abc"})
    assert request.headers["X-Signature"] != sign(SECRET, request.headers["X-Timestamp"], body)
    assert [s.state for s in ledger.states] == ["delivered"] and ledger.states[0].host == "hooks.contoso.com"
    assert queues.sent == []


def test_a_failure_goes_back_on_the_queue_hidden_for_a_backoff():
    queues, ledger, _ = deliver(lambda r: httpx.Response(503))
    [(name, again, delay)] = queues.sent
    assert name == "provision-callbacks" and again["attempts"] == 1 and 2 <= delay <= 4
    assert ledger.states[-1].state == "retrying" and ledger.states[-1].lastStatus == 503


def test_an_unreachable_receiver_is_retried():
    def down(request):
        raise httpx.ConnectError("refused", request=request)
    queues, ledger, _ = deliver(down)
    assert queues.sent[0][0] == "provision-callbacks" and ledger.states[-1].lastError == "ConnectError"


def test_the_last_attempt_dead_letters_with_the_message():
    queues, ledger, _ = deliver(lambda r: httpx.Response(500), attempts=2)
    [(name, letter, _)] = queues.sent
    assert name == "provision-deadletter" and letter["reason"]["code"] == "CallbackFailed"
    assert letter["attempts"] == 3 and json.loads(letter["original"])["resultId"] == "r:0"
    assert ledger.states[-1].state == "failed"


def test_redirects_are_not_followed_and_not_retried():
    queues, ledger, seen = deliver(lambda r: httpx.Response(302, headers={"Location": "https://10.0.0.1/"}))
    assert len(seen) == 1 and queues.sent[0][1]["reason"]["code"] == "CallbackRedirected"


def test_a_host_removed_from_the_list_since_intake_is_not_called():
    queues, ledger, seen = deliver(lambda r: httpx.Response(200), CALLBACK_ALLOWED_HOSTS="other.example")
    assert seen == [] and queues.sent[0][1]["reason"]["code"] == "CallbackUrlRefused"


def test_the_state_never_shows_the_url_path_or_query():
    _, ledger, _ = deliver(lambda r: httpx.Response(500))
    assert "token" not in ledger.states[-1].model_dump_json()


def test_schedule_records_pending_before_it_queues():
    order: list[str] = []

    class Q(Queues):
        def send_json(self, name, body, *, delay=0):
            order.append("queued")

    class L(Ledger):
        def record(self, request_id, state):
            order.append(state.state)
    result = ResultMessage(result="Success", resultId="r:0", requestId="r", servicePrincipalId="sp", jobId="j",
                           ruleId="x", subject=Subject(objectId="o", objectTypeName="User"), callIndex=0, callCount=1,
                           attempts=1, receivedAt=NOW, completedAt=NOW)
    callbacks.schedule([(result, "https://hooks.contoso.com/"), (result, None)], Q(), L(), settings())
    assert order == ["pending", "queued"]


def test_the_delivery_client_follows_no_redirects():
    assert callbacks.http_client(settings()).follow_redirects is False


def test_operator_cli_replays_a_callback_dead_letter_from_a_fresh_start():
    from shared.deadletters import dead_letter_for
    from shared.models import DeadLetter, ErrorInfo
    from tools.cli import _replay_target
    letter = dead_letter_for(ErrorInfo(code="CallbackFailed", message="x"), "callback", message(attempts=3))
    kind, text = _replay_target(DeadLetter.model_validate_json(letter.model_dump_json()))
    assert kind == "callback" and CallbackMessage.model_validate_json(text).attempts == 0


def test_operator_cli_adds_the_callback_url_to_each_event():
    from tools.cli import _with_callback
    stamped = json.loads(_with_callback('[{"objectId": "a"}, {"objectId": "b"}]', "https://hooks.contoso.com/x"))
    assert [e["callbackUrl"] for e in stamped] == ["https://hooks.contoso.com/x"] * 2


def test_a_bulk_post_resolves_each_host_once_and_names_the_bad_item():
    asked: list[str] = []

    def resolve(host, port, type=0):
        asked.append(host)
        return resolver("10.0.0.1" if host.startswith("bad") else "20.50.2.1")(host, port, type)
    urls = [(f"[{i}].callbackUrl", f"https://hooks.contoso.com/ticket/{i}") for i in range(50)]
    callbacks.check_requests(urls, settings(), resolve)
    assert asked == ["hooks.contoso.com"]
    with pytest.raises(RequestRejected) as info:
        callbacks.check_requests(urls + [("[50].callbackUrl", "https://bad.tickets.example/")], settings(), resolve)
    assert info.value.info.details[0]["field"] == "[50].callbackUrl"
