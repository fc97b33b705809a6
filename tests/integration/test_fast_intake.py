"""Fast intake (issue 13) against Azurite, in process through the real handlers, status store,
schedule and queues: the HTTP door answers 202 after one queue write per envelope; the status read
answers from the first moment; the queue door admits an envelope under its ids on every delivery;
backpressure refuses on the peeked timeline without booking."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from azure.core.exceptions import ServiceRequestError

from shared import handlers
from shared.errors import StatusStoreUnavailable
from shared.intake import envelope
from tests.integration.test_idempotency import rt as idem_rt  # noqa: F401  (on Azurite, own queues and tables)


@pytest.fixture
def rt(request):
    runtime = request.getfixturevalue("idem_rt")
    runtime.settings = runtime.settings.model_copy(update={"fast_intake": True})
    return runtime


def user() -> str:
    return str(uuid.uuid4())


def post(rt, body, key: str | None = None):
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    return handlers.provision_http(json.dumps(body).encode(), headers, rt)


def status(rt, request_id: str) -> tuple[int, dict]:
    reply = handlers.request_status(request_id, rt)
    return reply.status, reply.body


def intake_messages(rt) -> list:
    return list(rt.queues.get(rt.settings.intake_queue).receive_messages(max_messages=32, visibility_timeout=1))


def work_messages(rt) -> int:
    """Visible and delayed alike."""
    return rt.queues.get(rt.settings.work_queue).get_queue_properties().approximate_message_count


def test_a_get_right_after_the_202_answers_received_and_then_queued(rt):
    reply = post(rt, [{"objectId": user(), "objectTypeName": "User", "correlationId": f"hr-{i}"} for i in range(3)])
    assert reply.status == 202 and reply.work == []
    ids = [r["requestId"] for r in reply.body["requests"]]
    for rid in ids:
        code, body = status(rt, rid)
        assert code == 200 and body["state"] == "received" and body["callCount"] == 1 and body["calls"] == []
    [message] = intake_messages(rt)
    due = handlers.intake_message(message.content, rt, message_id=message.id)
    assert all(status(rt, rid)[1]["state"] == "queued" for rid in ids)
    assert len(due) + work_messages(rt) == 3


def test_a_guid_nobody_was_given_is_still_unknown(rt):
    reply = post(rt, {"objectId": user(), "objectTypeName": "User"})
    [rid] = [r["requestId"] for r in reply.body["requests"]]
    post_id, index, secret = envelope.post_of(rid)
    guessed = uuid.UUID(rid.replace("-", "")[:13] + f"{(int(secret[0], 16) + 1) % 16:x}" + rid.replace("-", "")[14:])
    assert envelope.post_of(str(guessed))[:2] == (post_id, index)  # the right post and index, another secret
    for other in (str(guessed), envelope.request_id(post_id, envelope.new_post()[1], 1),
                  envelope.request_id(*envelope.new_post(), 0), str(uuid.uuid4())):
        code, body = status(rt, other)
        assert code == 404 and body["error"]["code"] == "RequestNotFound"


def test_a_redelivered_envelope_is_the_same_requests(rt):
    reply = post(rt, [{"objectId": user(), "objectTypeName": "User"} for _ in range(4)])
    ids = {r["requestId"] for r in reply.body["requests"]}
    [message] = intake_messages(rt)
    first = handlers.intake_message(message.content, rt, message_id=message.id)
    rows = sorted((e["PartitionKey"], e["RowKey"]) for e in rt.status.table.list_entities())
    sent = work_messages(rt)
    assert len(first) + sent == 4 and {pk for pk, rk in rows if rk == "request"} == ids
    # The host dies after admitting and delivers the message again (with a new dequeue count).
    again = handlers.intake_message(message.content, rt, delivery=2, message_id=message.id)
    assert sorted((e["PartitionKey"], e["RowKey"]) for e in rt.status.table.list_entities()) == rows
    # Only the calls whose work went to the output binding (not known to be queued) go again,
    # under the same requestIds (at-least-once, README "When a subject can be called twice").
    assert len(again) + work_messages(rt) - sent == len(first)
    requeued = [json.loads(m.content) for m in rt.queues.get(rt.settings.work_queue).peek_messages(32)]
    assert {w["requestId"] for w in [json.loads(t) for t in again] + requeued} <= ids


def test_backpressure_refuses_on_the_peeked_timeline_without_booking(rt):
    rt.settings = rt.settings.model_copy(update={"max_expected_wait_hours": 0.01})
    rt.schedule_for().book(30)  # 30 slots of 2 s: past MAX_EXPECTED_WAIT_HOURS (36 s)
    timeline = rt.queues.get(rt.schedule_queue()).peek_messages()[0].content
    reply = post(rt, {"objectId": user(), "objectTypeName": "User"})
    assert reply.status == 503 and reply.body["error"]["code"] == "BacklogTooLong"
    assert int(reply.headers["Retry-After"]) >= 1
    assert rt.queues.get(rt.schedule_queue()).peek_messages()[0].content == timeline  # nothing booked
    assert intake_messages(rt) == [] and not rt.status._created  # the status table was not even touched


def test_a_dry_run_and_a_replayed_key_queue_nothing(rt):
    event = {"objectId": user(), "objectTypeName": "User"}
    dry = handlers.provision_http(json.dumps(event).encode(), {"Content-Type": "application/json"}, rt,
                                  {"dryRun": "true"})
    assert dry.status == 200 and intake_messages(rt) == []
    first, again = post(rt, event, key="k-1"), post(rt, event, key="k-1")
    assert first.status == again.status == 202 and first.body == again.body
    assert again.headers["Idempotent-Replayed"] == "true" and len(intake_messages(rt)) == 1


def posting_behind_a_slow_write(rt, fail_second: bool) -> tuple[dict, list]:
    """POST a; while its envelope is being sent, POST b and c; returns the replies by name and the
    envelope texts sent. The first send is held until b and c wait behind it (a slow queue write)."""
    inner, held, sending, sent = rt.queues.send_text, threading.Event(), threading.Event(), []

    def send_text(queue: str, text: str, **options):
        if queue != rt.settings.intake_queue:  # a work message booked later than now, when admitted
            return inner(queue, text, **options)
        if not sent:
            sending.set()
            assert held.wait(10)
        elif fail_second:
            raise ServiceRequestError("connection reset")
        sent.append(text)
        return inner(queue, text)
    rt.queues.send_text = send_text
    replies: dict = {}

    def run(name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: replies.__setitem__(
            name, post(rt, {"objectId": user(), "objectTypeName": "User", "correlationId": name})))
        thread.start()
        return thread
    threads = [run("a")]
    assert sending.wait(10)
    threads += [run("b"), run("c")]
    deadline = time.monotonic() + 10
    while len(rt.intake_commits._waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    held.set()
    for thread in threads:
        thread.join(20)
    return replies, sent


def test_posts_answered_together_share_one_received_row_and_one_envelope(rt):
    replies, sent = posting_behind_a_slow_write(rt, fail_second=False)
    assert {name: reply.status for name, reply in replies.items()} == {"a": 202, "b": 202, "c": 202}
    posts = {name: envelope.post_of(reply.body["requests"][0]["requestId"]) for name, reply in replies.items()}
    assert posts["b"][0] == posts["c"][0] != posts["a"][0] and {posts["b"][1], posts["c"][1]} == {0, 1}
    messages = intake_messages(rt)
    assert len(sent) == 2 and len(messages) == 2
    for message in messages:
        handlers.intake_message(message.content, rt, message_id=message.id)
    for name, reply in replies.items():
        code, body = status(rt, reply.body["requests"][0]["requestId"])
        assert code == 200 and body["state"] == "queued" and body["correlationId"] == name


def test_a_shared_write_that_fails_refuses_every_post_in_it_and_no_other(rt):
    replies, sent = posting_behind_a_slow_write(rt, fail_second=True)
    assert {name: reply.status for name, reply in replies.items()} == {"a": 202, "b": 503, "c": 503}
    assert replies["b"].body["error"]["code"] == "IntakeQueueUnavailable" and len(intake_messages(rt)) == 1
    assert post(rt, {"objectId": user(), "objectTypeName": "User"}).status == 503  # the fault goes on


def envelopes_admitted_behind_a_slow_admission(rt, count: int, fail_second: bool,
                                               again: int = 0) -> tuple[list, list, list]:
    """Queue `count` single-request envelopes; hand the first to the queue door, and the others
    (then the last `again` of them a second time: deliveries of the same message) while its
    admission is held (a slow table); returns the deliveries, each one's outcome (in the same
    order), and the sizes of the admission rounds."""
    for n in range(count):
        assert post(rt, {"objectId": user(), "objectTypeName": "User", "correlationId": f"e{n}"}).status == 202
    messages = intake_messages(rt)
    deliveries = messages + messages[len(messages) - again:]
    inner, held, admitting, rounds = rt.status.admit, threading.Event(), threading.Event(), []

    def admit(items):
        rounds.append(len(items))
        if len(rounds) == 1:
            admitting.set()
            assert held.wait(10)
        elif fail_second:
            raise StatusStoreUnavailable("table outage")
        return inner(items)
    rt.status.admit = admit
    outcomes: list = [None] * len(deliveries)

    def run(index: int) -> threading.Thread:
        def deliver() -> None:
            message = deliveries[index]
            try:
                outcomes[index] = handlers.intake_message(message.content, rt, message_id=message.id)
            except StatusStoreUnavailable as exc:
                outcomes[index] = exc
        thread = threading.Thread(target=deliver)
        thread.start()
        return thread
    threads = [run(0)]
    assert admitting.wait(10)
    for index in range(1, len(deliveries)):
        threads.append(run(index))
        deadline = time.monotonic() + 10  # one by one: the deliveries wait in this order
        while len(rt.admission_commits._waiting) < index and time.monotonic() < deadline:
            time.sleep(0.01)
    held.set()
    for thread in threads:
        thread.join(20)
    rt.status.admit = inner
    return deliveries, outcomes, rounds


def ids_in(message) -> set[str]:
    return {r.requestId for r in envelope.opened(message.content)}


def test_envelopes_delivered_together_are_admitted_in_one_round_and_each_returns_its_own_work(rt):
    messages, outcomes, rounds = envelopes_admitted_behind_a_slow_admission(rt, 4, fail_second=False)
    assert rounds == [1, 3]
    for message, outcome in zip(messages, outcomes):
        assert all(json.loads(text)["requestId"] in ids_in(message) for text in outcome)
        assert all(status(rt, rid)[1]["state"] == "queued" for rid in ids_in(message))
    assert sum(len(work) for work in outcomes) + work_messages(rt) == 4


def test_a_failed_admission_round_fails_every_message_in_it_and_their_redelivery_is_the_same_requests(rt):
    messages, outcomes, rounds = envelopes_admitted_behind_a_slow_admission(rt, 3, fail_second=True)
    assert rounds == [1, 2] and isinstance(outcomes[0], list)
    assert all(isinstance(outcome, StatusStoreUnavailable) for outcome in outcomes[1:])
    for message in messages[1:]:  # the host delivers them again
        handlers.intake_message(message.content, rt, delivery=2, message_id=message.id)
        assert all(status(rt, rid)[1]["state"] == "queued" for rid in ids_in(message))


def test_a_message_delivered_again_into_the_round_of_its_first_delivery_is_admitted_once_by_the_later_one(rt):
    """The devhost abandons an invocation that waited out functionTimeout behind a slow round (its
    outputs are discarded) and delivers the message again, to the same process: both deliveries
    can wait for the same round. The later one's outputs are the ones sent and its success deletes
    the message, so it must carry the work; the request is booked once."""
    deliveries, outcomes, rounds = envelopes_admitted_behind_a_slow_admission(rt, 2, fail_second=False, again=1)
    assert deliveries[1].id == deliveries[2].id
    assert outcomes[1] == []  # the earlier delivery's outputs may be discarded
    assert rounds == [1, 1]   # the second round admits the request once
    assert sum(len(work) for work in outcomes) + work_messages(rt) == 2
    assert all(json.loads(text)["requestId"] in ids_in(deliveries[2]) for text in outcomes[2])
    assert all(status(rt, rid)[1]["state"] == "queued" for rid in ids_in(deliveries[2]))


def test_the_upkeep_sweeps_received_markers_only_once_no_intake_message_could_admit_them(rt):
    from shared.status.received import KEPT_SECONDS

    admitted = post(rt, [{"objectId": user(), "objectTypeName": "User"} for _ in range(2)])
    dead = post(rt, {"objectId": user(), "objectTypeName": "User"})
    ids = {name: [r["requestId"] for r in reply.body["requests"]] for name, reply in
           (("admitted", admitted), ("dead", dead))}
    rt.status.marks.clock = lambda: time.time() + KEPT_SECONDS + 1   # both markers over an hour old
    intake = rt.queues.get(rt.settings.intake_queue)
    handlers.lease_upkeep(rt)                  # both envelopes still queued: nothing swept
    assert {status(rt, rid)[1]["state"] for rid in ids["admitted"] + ids["dead"]} == {"received"}
    envelopes = {json.loads(m.content)["postId"]: m for m in intake.receive_messages(max_messages=32,
                                                                                      visibility_timeout=60)}
    handlers.lease_upkeep(rt)                  # being processed (invisible) still counts
    assert status(rt, ids["dead"][0])[1]["state"] == "received"
    for post_id, message in envelopes.items():
        if post_id == envelope.post_of(ids["admitted"][0])[0]:
            handlers.intake_message(message.content, rt, message_id=message.id)
        intake.delete_message(message)         # the other one as if dead-lettered: never admitted
    handlers.lease_upkeep(rt)
    assert not [e for e in rt.status.table.list_entities() if e["PartitionKey"].startswith("post-")]
    assert {status(rt, rid)[1]["state"] for rid in ids["admitted"]} == {"queued"}
    code, body = status(rt, ids["dead"][0])
    assert code == 404 and "dead-letter queue" in body["error"]["message"]


def test_a_received_row_that_cannot_be_written_refuses_the_post_and_withdraws_its_envelope(rt):
    """The row and the envelope are written at the same time: when the row fails, the envelope
    already sent is deleted again, so nothing answered 503 is admitted."""
    sent = threading.Event()
    inner_send = rt.queues.send_text

    def send_text(queue: str, text: str):
        message = inner_send(queue, text)
        sent.set()
        return message

    def mark_received(post_id, key, requests):
        assert sent.wait(5)  # the envelope is on the queue before the row fails
        raise StatusStoreUnavailable("table outage")
    rt.queues.send_text, rt.status.mark_received = send_text, mark_received
    reply = post(rt, {"objectId": user(), "objectTypeName": "User"})
    assert reply.status == 503 and reply.body["error"]["code"] == "StatusStoreUnavailable"
    assert sent.is_set() and rt.queues.get(rt.settings.intake_queue).peek_messages() == []
