"""Issue 13 N2 and N5 against Azurite: Idempotency-Key on POST /api/provision and the signature
replay cache, through the real handler, status store, schedule and table service (in process), and
once through devhost and the Graph simulator (HTTP, one Graph call for two posts)."""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from azure.core.exceptions import ServiceRequestError

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP
from shared import handlers
from shared.intake import envelope
from shared.intake.idempotency import Answer, AnswerBook
from shared.intake.signatures import sign
from shared.runtime import build_runtime
from shared.settings import Settings
from tests.conftest import IsolatedHost


def user() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def rt(azurite):
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(AzureWebJobsStorage=azurite.connection_string, DEFAULT_SERVICE_PRINCIPAL_ID=EXAMPLE_SP,
                        DEFAULT_JOB_ID=EXAMPLE_JOB, DEFAULT_RULE_ID=EXAMPLE_RULE, WORK_QUEUE=f"idem-work-{suffix}",
                        INTAKE_QUEUE=f"idem-intake-{suffix}",
                        LEASE_QUEUE=f"idem-lease-{suffix}", DEADLETTER_QUEUE=f"idem-dead-{suffix}",
                        STATUS_TABLE=f"idemstatus{suffix}", IDEMPOTENCY_TABLE=f"idemkeys{suffix}")
    runtime = build_runtime(settings)
    yield runtime
    for table in (runtime.status.table, runtime.answers.table):
        table.delete_table()


def rows(rt) -> int:
    return sum(1 for _ in rt.status.table.list_entities())


def queued(rt, *replies) -> int:
    """The calls these posts queued: the work a synchronous door hands its output binding, and the
    calls in the envelopes a fast-intake door put on the intake queue (peeked, so they stay there)."""
    peeked = rt.queues.get(rt.settings.intake_queue).peek_messages(max_messages=32)
    in_envelopes = sum(len(request.items) for m in peeked if envelope.is_envelope(m.content)
                       for request in envelope.opened(m.content))
    return sum(len(reply.work) for reply in replies) + in_envelopes


def post(rt, body, key: str | None = None, **kwargs):
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return handlers.provision_http(raw, headers, rt, **kwargs)


def test_a_retry_with_the_key_gets_the_same_202_and_queues_nothing(rt):
    event = [{"objectId": user(), "objectTypeName": "User"}, {"objectId": user(), "objectTypeName": "User"}]
    first = post(rt, event, key="order-42")
    assert first.status == 202 and queued(rt, first) == 2 and "Idempotent-Replayed" not in first.headers
    written = rows(rt)
    # The retry re-serialises the same payload differently: still the same request.
    again = post(rt, json.dumps(event, indent=2).encode(), key='"order-42"')
    assert again.status == 202 and again.body == first.body and again.headers["Idempotent-Replayed"] == "true"
    assert queued(rt, first, again) == 2 and rows(rt) == written   # no new call, no new status row
    other = post(rt, [event[0]], key="order-42")
    assert other.status == 422 and other.body["error"]["code"] == "IdempotencyKeyReused"
    assert queued(rt, first, again, other) == 2 and rows(rt) == written
    without = post(rt, event)                                 # no key: a new request, as before
    assert without.status == 202 and without.body["requests"][0]["requestId"] != first.body["requests"][0]["requestId"]


def test_concurrent_first_uses_of_one_key_make_exactly_one_request(rt):
    event, replies, barrier = {"objectId": user(), "objectTypeName": "User"}, [], threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        replies.append(post(rt, event, key="burst"))
    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acted = [r for r in replies if r.status == 202 and "Idempotent-Replayed" not in r.headers]
    assert len(acted) == 1 and queued(rt, *replies) == 1
    assert all(r.status in (202, 409) for r in replies)
    assert {r.body["requests"][0]["requestId"] for r in replies if r.status == 202} == \
        {acted[0].body["requests"][0]["requestId"]}
    assert all(r.headers.get("Retry-After") for r in replies if r.status == 409)


def test_a_refused_request_leaves_its_key_free_for_the_corrected_retry(rt):
    bad = post(rt, {"objectId": "not-a-guid", "objectTypeName": "User"}, key="fix-me")
    assert bad.status == 422 and bad.body["error"]["code"] == "ValidationFailed"
    assert post(rt, {"objectId": user(), "objectTypeName": "User"}, key="fix-me").status == 202


def test_a_dry_run_does_not_use_up_the_key(rt):
    event = {"objectId": user(), "objectTypeName": "User"}
    dry = post(rt, event, key="try-first", params={"dryRun": "true"})
    assert dry.status == 200 and queued(rt, dry) == 0
    real = post(rt, event, key="try-first")
    assert real.status == 202 and queued(rt, real) == 1


def test_keys_are_scoped_by_caller(rt):
    event = {"objectId": user(), "objectTypeName": "User"}
    a = post(rt, event, key="same", caller="app-a")
    b = post(rt, {"objectId": user(), "objectTypeName": "User"}, key="same", caller="app-b")
    assert a.status == b.status == 202 and a.body != b.body


def test_a_key_table_outage_is_a_503_and_nothing_is_queued(rt):
    accepted = post(rt, {"objectId": user(), "objectTypeName": "User"})
    assert accepted.status == 202
    before, real = rows(rt), rt.answers.table
    # Nothing listens on port 9: every table request fails as in an outage.
    rt.answers.table = real.__class__.from_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;", "nowhere", retry_total=0)
    rt.answers._created = False
    try:
        reply = post(rt, {"objectId": user(), "objectTypeName": "User"}, key="k")
    finally:
        rt.answers.table = real
    assert reply.status == 503 and reply.body["error"]["code"] == "KeyStoreUnavailable"
    assert queued(rt, accepted, reply) == 1
    assert rows(rt) == before


def test_a_signature_is_accepted_once_and_again_after_a_refusal(rt):
    rt.settings = rt.settings.model_copy(update={"webhook_hmac_secret": "s" * 32})
    body = json.dumps({"objectId": user(), "objectTypeName": "User"}).encode()
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Timestamp": ts, "X-Signature": sign("s" * 32, ts, body)}
    assert handlers.provision_http(body, headers, rt).status == 202
    replayed = handlers.provision_http(body, headers, rt)
    assert replayed.status == 401 and replayed.body["error"]["code"] == "SignatureReplayed"
    bad = json.dumps({"objectId": "x", "objectTypeName": "User"}).encode()
    bad_headers = {**headers, "X-Signature": sign("s" * 32, ts, bad)}
    assert handlers.provision_http(bad, bad_headers, rt).status == 422
    # Not acted on: the verbatim retry is judged again, not refused as a replay.
    assert handlers.provision_http(bad, bad_headers, rt).status == 422


# -- through devhost: two posts with one key, one Graph call ----------------------------------------
@pytest.fixture(scope="module")
def host(azurite, tmp_path_factory):
    h = IsolatedHost(azurite, tmp_path_factory.mktemp("idem"), "idem", DEFAULT_RULE_ID=EXAMPLE_RULE,
                     IDEMPOTENCY_TABLE=f"idemhost{uuid.uuid4().hex[:8]}")
    yield h
    h.stop()


def test_over_http_the_retry_is_answered_from_memory_and_graph_is_called_once(host):
    subject = user()
    body = json.dumps({"objectId": subject, "objectTypeName": "User"})
    send = lambda: httpx.post(f"{host.host.url}/api/provision", content=body, timeout=30,  # noqa: E731
                              headers={"Content-Type": "application/json", "Idempotency-Key": "hr-event-7"})
    first, second = send(), send()
    assert first.status_code == second.status_code == 202 and first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    [request] = first.json()["requests"]
    host.results.wait_for(lambda m: m.get("requestId") == request["requestId"], timeout=60)
    # A second call would have been queued by the second post, before this result was written.
    assert host.queue("WORK_QUEUE").peek_messages(max_messages=32) == []
    assert len([c for c in host.sims.graph.calls() if subject in json.dumps(c)]) == 1


def test_the_sweep_deletes_expired_rows_on_the_real_table_service(rt):
    clock = [time.time()]
    answers = AnswerBook(rt.answers.table, retention_seconds=60, clock=lambda: clock[0])
    answers.remember(answers.recall("a", "(shared)", "h"), Answer(status=202, body={"x": 1}))
    assert answers.claim_once("sig", "webhook-signature", 600) is not None
    clock[0] += 61
    assert answers.sweep() == 1                              # the key; the signature lives 600 s
    assert [r["state"] for r in rt.answers.table.list_entities()] == ["done"]
    assert answers.recall("a", "(shared)", "other").state == "new"


def test_the_upkeep_timer_runs_the_sweep(rt):
    clock = [time.time()]
    rt.answers = AnswerBook(rt.answers.table, retention_seconds=60, clock=lambda: clock[0])
    rt.answers.remember(rt.answers.recall("a", "(shared)", "h"), Answer(status=202, body={"x": 1}))
    clock[0] += 61
    handlers.lease_upkeep(rt)
    assert list(rt.answers.table.list_entities()) == []


def test_a_202_whose_answer_cannot_be_remembered_is_still_a_202_and_the_retry_waits(rt):
    # The calls are queued before the answer is stored: the caller must hear "accepted", and a
    # retry must not queue them again while the key is pending.
    class RememberFails:
        def __init__(self, table):
            self.table = table

        def __getattr__(self, name):
            return getattr(self.table, name)

        def update_entity(self, *args, **kwargs):
            raise ServiceRequestError("connection reset")
    real, event = rt.answers.table, {"objectId": user(), "objectTypeName": "User"}
    rt.answers.table = RememberFails(real)
    try:
        first = post(rt, event, key="lost-answer")
    finally:
        rt.answers.table = real
    assert first.status == 202 and queued(rt, first) == 1
    retry = post(rt, event, key="lost-answer")
    assert retry.status == 409 and queued(rt, first, retry) == 1 and retry.headers["Retry-After"]
