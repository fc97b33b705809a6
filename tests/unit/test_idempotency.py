"""Issue 13 N2: remembered answers by key (AnswerBook) on the in-memory table model, and the
Idempotency-Key header's form. The HTTP door against Azurite: tests/integration/test_idempotency.py."""
from __future__ import annotations

import json
import threading

import pytest

from shared.errors import KeyStoreUnavailable, RequestRejected
from shared.intake.idempotency import (
    PENDING_SECONDS,
    SWEEP_EVERY_SECONDS,
    Answer,
    AnswerBook,
    body_hash,
    idempotency_key,
)
from tests.fakes import MemoryTable, outage

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock | None = None, table: MemoryTable | None = None) -> AnswerBook:
    return AnswerBook(table or MemoryTable(), retention_seconds=24 * HOUR, clock=clock or Clock())


ANSWER = Answer(status=202, body={"accepted": 1, "requests": [{"requestId": "r-1", "calls": 1}]})


def test_the_first_use_holds_the_key_and_a_retry_gets_its_answer():
    answers = book()
    first = answers.recall("k", "(shared)", "h")
    assert first.state == "new"
    answers.remember(first, ANSWER)
    again = answers.recall("k", "(shared)", "h")
    assert again.state == "replay" and again.answer == ANSWER


def test_the_same_key_with_another_payload_is_a_mismatch():
    answers = book()
    answers.remember(answers.recall("k", "(shared)", "h"), ANSWER)
    assert answers.recall("k", "(shared)", "other").state == "mismatch"


def test_keys_are_scoped_to_the_caller():
    answers = book()
    answers.remember(answers.recall("k", "caller-a", "h"), ANSWER)
    assert answers.recall("k", "caller-b", "other").state == "new"
    assert answers.recall("k", "(shared)", "h").state == "new"


def test_a_retry_while_the_first_is_still_working_is_in_progress():
    answers = book()
    answers.recall("k", "(shared)", "h")
    assert answers.recall("k", "(shared)", "h").state == "in-progress"


def test_concurrent_first_uses_exactly_one_wins():
    answers, barrier = book(), threading.Barrier(16)
    states: list[str] = []

    def use() -> None:
        barrier.wait()
        states.append(answers.recall("k", "(shared)", "h").state)
    threads = [threading.Thread(target=use) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states.count("new") == 1 and states.count("in-progress") == 15


def test_a_key_is_remembered_for_the_retention_then_free():
    clock = Clock()
    answers = book(clock)
    answers.remember(answers.recall("k", "(shared)", "h"), ANSWER)
    clock.now += 24 * HOUR - 1
    assert answers.recall("k", "(shared)", "other").state == "mismatch"
    clock.now += 2
    assert answers.recall("k", "(shared)", "other").state == "new"


def test_a_claim_whose_attempt_died_is_taken_over_after_the_http_limit_and_only_once():
    clock = Clock()
    answers = book(clock)
    dead = answers.recall("k", "(shared)", "h")
    clock.now += PENDING_SECONDS + 1
    taker = answers.recall("k", "(shared)", "h")
    assert taker.state == "new"
    assert answers.recall("k", "(shared)", "h").state == "in-progress"
    # The dead attempt's late answer does not overwrite the taker's claim.
    answers.remember(dead, Answer(status=202, body={"late": True}))
    answers.remember(taker, ANSWER)
    assert answers.recall("k", "(shared)", "h").answer == ANSWER


def test_a_forgotten_key_can_be_used_again():
    answers = book()
    answers.forget(answers.recall("k", "(shared)", "h"))
    assert answers.recall("k", "(shared)", "other").state == "new"


def test_a_202_for_a_thousand_requests_is_remembered_in_parts_within_the_property_limit():
    big = Answer(status=202, body={"accepted": 1000, "requests": [
        {"requestId": f"{i:08d}-0000-4000-8000-000000000000", "correlationId": "c" * 100, "calls": 1,
         "priority": "normal"} for i in range(1000)]})
    table = MemoryTable()  # refuses a string property over 32 K UTF-16 units, as the service does
    answers = book(table=table)
    answers.remember(answers.recall("k", "(shared)", "h"), big)
    assert answers.recall("k", "(shared)", "h").answer == big


def test_an_outage_is_key_store_unavailable_never_a_silent_pass():
    table = MemoryTable()
    answers = book(table=table)
    claim = answers.recall("k", "(shared)", "h")
    table.fault = outage
    with pytest.raises(KeyStoreUnavailable):
        answers.recall("k2", "(shared)", "h")
    with pytest.raises(KeyStoreUnavailable):
        answers.remember(claim, ANSWER)


@pytest.mark.parametrize("value,key", [("abc", "abc"), ('"8e03978e-40d5-43e8-bc93-6894a57f9324"',
                                                         "8e03978e-40d5-43e8-bc93-6894a57f9324"), (" k ", "k")])
def test_the_key_may_be_a_structured_field_string_or_bare(value, key):
    assert idempotency_key({"idempotency-KEY": value}) == key


@pytest.mark.parametrize("value", ["", '""', "x" * 256, "caf\u00e9", "a\nb", "\x00"])
def test_a_malformed_key_is_a_400_naming_the_header(value):
    with pytest.raises(RequestRejected) as info:
        idempotency_key({"Idempotency-Key": value})
    assert info.value.status == 400 and info.value.info.code == "InvalidIdempotencyKey"


def test_no_header_no_key():
    assert idempotency_key({"Content-Type": "application/json"}) is None


def test_the_payload_hash_ignores_formatting_not_content():
    event = {"objectId": "x", "objectTypeName": "User", "members": ["a", "b"]}
    assert body_hash(json.dumps(event)) == body_hash(json.dumps(event, indent=2, sort_keys=True))
    assert body_hash(json.dumps(event)) != body_hash(json.dumps({**event, "members": ["b", "a"]}))
    assert body_hash("{not json") != body_hash("{not json ")


def test_the_sweep_deletes_expired_keys_hourly_and_keeps_live_or_reclaimed_ones():
    clock, table = Clock(), MemoryTable()
    answers = book(clock, table)
    answers.remember(answers.recall("old", "(shared)", "h"), ANSWER)
    clock.now += 12 * HOUR
    answers.remember(answers.recall("young", "(shared)", "h"), ANSWER)
    assert answers.claim_once("sig", "webhook-signature", 600) is not None
    clock.now += 12 * HOUR + 1                   # "old" and the signature have expired, "young" has not
    assert answers.sweep() == 2 and len(table.rows) == 1
    assert answers.recall("young", "(shared)", "h").state == "replay"
    clock.now += 30 * HOUR - 1                  # "young" has expired now too...
    answers._swept_at = clock.now - SWEEP_EVERY_SECONDS + 1
    assert answers.sweep() == 0                 # ...but this process swept less than an hour ago
    clock.now += 1
    assert answers.sweep() == 1 and table.rows == {}


def test_a_key_claimed_again_between_the_sweeps_query_and_its_delete_is_kept():
    clock, table = Clock(), MemoryTable()
    answers = book(clock, table)
    answers.remember(answers.recall("k", "(shared)", "h"), ANSWER)
    clock.now += 25 * HOUR
    query = table.query_entities

    def racing_query(*args, **kwargs):
        rows = query(*args, **kwargs)
        answers.recall("k", "(shared)", "new-body")  # takes the expired row over: new etag
        return rows
    table.query_entities = racing_query
    assert answers.sweep() == 0 and answers.recall("k", "(shared)", "new-body").state == "in-progress"


def test_a_sweep_during_an_outage_does_not_raise():
    table = MemoryTable()
    table.fault = outage
    assert book(table=table).sweep() == 0
