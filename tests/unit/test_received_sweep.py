"""Fast intake's received markers are swept (shared/operations/received_sweep.py): an hour old, and
only once no intake message could still admit their requests; a request admitted meanwhile still
reads from its request row, and one never admitted answers a 404 that says why, never `received`
for ever. On the in-memory table (tests/fakes.py MemoryTable)."""
from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest

from shared import handlers
from shared.intake import envelope
from shared.models import Subject, WorkItem, utcnow
from shared.operations import received_sweep
from shared.operations.readiness import PARKED_SUFFIX
from shared.settings import Settings
from shared.status.received import KEPT_SECONDS, RECEIVED
from shared.status.store import StatusStore
from tests.fakes import Clock, MemoryTable, outage

SP, JOB, RULE = "c8c95753-f628-48e1-9fab-76c2d4cf624c", "job1", "rule1"
SETTINGS = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")


class CountedQueues:
    """Queues as the sweep sees them: only their approximate message counts."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def get(self, name: str) -> SimpleNamespace:
        count = self.counts.get(name, 0)
        return SimpleNamespace(get_queue_properties=lambda: SimpleNamespace(approximate_message_count=count))


@pytest.fixture
def rt():
    clock, table = Clock(1_000_000.0), MemoryTable()
    store = StatusStore(table, coalesce=True, max_join_age=3600, clock=clock)
    return SimpleNamespace(settings=SETTINGS, status=store, queues=CountedQueues(), clock=clock, table=table)


def received(rt, requests: int) -> list[str]:
    """A post marked received, as the HTTP door does before its 202; returns its requestIds."""
    post, key = envelope.new_post()
    rt.status.mark_received(post, key, [(1, "normal")] * requests)
    return [envelope.request_id(post, key, i) for i in range(requests)]


def admit(rt, request_id: str) -> None:
    """What the queue door does with an envelope's request: calls admitted and queued, request row written."""
    item = WorkItem(requestId=request_id, callIndex=0, servicePrincipalId=SP, jobId=JOB, ruleId=RULE,
                    subject=Subject(objectId=str(uuid.uuid4()), objectTypeName="User"), receivedAt=utcnow())
    admitted = [a.item.model_copy(update={"notBefore": rt.clock.now + 60}) for a in rt.status.admit([item])]
    rt.status.mark_queued(admitted)
    rt.status.record_requests([(request_id, None, "normal", admitted)])


def get(rt, request_id: str) -> tuple[int, dict]:
    reply = handlers.request_status(request_id, rt)
    return reply.status, json.loads(reply.json())


def markers(rt) -> int:
    return sum(1 for _, row_key in rt.table.rows if row_key == RECEIVED)


def test_a_marker_goes_an_hour_on_once_the_intake_queue_is_empty_and_its_requests_read_truly(rt):
    admitted, dead = received(rt, 2)       # the first request admitted; the second's envelope dead-lettered
    admit(rt, admitted)
    rt.clock.now += KEPT_SECONDS - 60
    [young] = received(rt, 1)              # not yet an hour old when the sweep runs
    rt.clock.now += 61
    assert received_sweep.sweep(rt) == 1 and markers(rt) == 1
    assert get(rt, admitted)[1]["state"] == "queued"
    assert get(rt, young)[1]["state"] == RECEIVED
    code, body = get(rt, dead)
    assert code == 404 and body["error"]["code"] == "RequestNotFound"
    assert "dead-letter queue" in body["error"]["message"]
    # A GUID nobody was given (not of fast intake's form) is still a plain 404.
    code, body = get(rt, str(uuid.uuid4()))
    assert code == 404 and "dead-letter" not in body["error"]["message"]


@pytest.mark.parametrize("queued_on", ["", PARKED_SUFFIX])
def test_markers_stay_while_a_message_that_could_still_admit_them_is_queued(rt, queued_on):
    [waiting] = received(rt, 1)
    rt.clock.now += 24 * 3600                # hosts stopped for a day: its envelope is still queued
    rt.queues.counts[SETTINGS.intake_queue + queued_on] = 1
    assert received_sweep.sweep(rt) == 0 and markers(rt) == 1
    assert get(rt, waiting)[1]["state"] == RECEIVED
    rt.queues.counts.clear()                 # admitted (or dead-lettered) since
    assert received_sweep.sweep(rt) == 1 and markers(rt) == 0


def test_a_marker_written_again_between_the_sweeps_query_and_its_delete_is_kept(rt):
    [rid] = received(rt, 1)
    post, _, _ = envelope.post_of(rid)
    rt.clock.now += KEPT_SECONDS + 1
    query = rt.table.query_entities

    def racing_query(*args, **kwargs):
        rows = query(*args, **kwargs)
        key = rt.table.get_entity(f"post-{post}", RECEIVED)["key"]
        rt.status.mark_received(post, key, [(1, "normal")] * 2)  # written again meanwhile
        return rows
    rt.table.query_entities = racing_query
    assert received_sweep.sweep(rt) == 0 and get(rt, rid)[1]["state"] == RECEIVED


def test_only_markers_are_swept_and_at_most_a_batch_a_run(rt, monkeypatch):
    from shared.status import received as marks

    monkeypatch.setattr(marks, "SWEEP_BATCH", 3)
    ids = [rid for _ in range(5) for rid in received(rt, 1)]
    for rid in ids:
        admit(rt, rid)
    others = len(rt.table.rows) - markers(rt)
    rt.clock.now += KEPT_SECONDS + 1
    assert [received_sweep.sweep(rt), received_sweep.sweep(rt), received_sweep.sweep(rt)] == [3, 2, 0]
    assert markers(rt) == 0 and len(rt.table.rows) == others
    assert {get(rt, rid)[1]["state"] for rid in ids} == {"queued"}


def test_a_sweep_during_a_table_outage_does_not_raise(rt):
    received(rt, 1)
    rt.clock.now += KEPT_SECONDS + 1
    rt.table.fault = outage
    assert received_sweep.sweep(rt) == 0
