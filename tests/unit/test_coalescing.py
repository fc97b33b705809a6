"""The coalescing protocol (shared/status/) in process, on the in-memory table: every branch of
admit, mark queued, close, finish and withdraw, and the table model's own fidelity."""
from __future__ import annotations

import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError
from azure.data.tables import TableTransactionError

from shared.errors import StatusStoreUnavailable
from shared.models import Subject, WorkItem, utcnow
from shared.status.admission import ALREADY_QUEUED, JOINED, LEAD
from shared.status.rows import CALLING, MAX_FOLLOWERS, OPEN, group_key
from shared.status.store import StatusStore
from shared.status.table import delete_if_unchanged, merge
from tests.fakes import Clock, MemoryTable, no_fault, outage

SP, JOB, RULE = "c8c95753-f628-48e1-9fab-76c2d4cf624c", "job1", "rule1"


def call(subject: str, request_id: str | None = None, priority: str = "normal") -> WorkItem:
    return WorkItem(requestId=request_id or str(uuid.uuid4()), servicePrincipalId=SP, jobId=JOB, ruleId=RULE,
                    subject=Subject(objectId=subject, objectTypeName="User"), receivedAt=utcnow(), priority=priority)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.now = 1_000_000.0
    return c


@pytest.fixture
def store(clock) -> StatusStore:
    return StatusStore(MemoryTable(), coalesce=True, max_join_age=3600, clock=clock)


def admit(store: StatusStore, *items: WorkItem) -> list[str]:
    return [a.role for a in store.admit(list(items))]


def lead_and_queue(store: StatusStore, item: WorkItem, slot: float = 2_000_000.0) -> WorkItem:
    [admitted] = store.admit([item])
    assert admitted.role == LEAD
    placed = admitted.item.model_copy(update={"notBefore": slot})
    store.mark_queued([placed])
    return placed


def rows(store: StatusStore, item: WorkItem) -> dict[str, dict]:
    return {e["RowKey"]: e for e in store.table.query_entities("PartitionKey eq @id", parameters={"id": group_key(item)})}


# -- admit ----------------------------------------------------------------------------------------
def test_admit_returns_new_items_and_leaves_the_callers_untouched(store):
    mine = call("u1")
    [admitted] = store.admit([mine])
    assert admitted.role == LEAD and admitted.item.coalesceKey == group_key(mine) and admitted.item.openEtag
    assert (mine.coalesceKey, mine.openEtag) == (None, None)


def test_nobody_joins_a_group_whose_work_is_not_known_to_be_queued(store):
    first, second = call("u1"), call("u1")
    assert admit(store, first) == [LEAD]
    assert admit(store, second) == [LEAD]                   # a call of its own, outside the group
    assert rows(store, first)[OPEN]["leader"] == first.call_id
    assert not rows(store, second)[second.call_id].get("servedBy")


def test_an_equal_call_joins_a_queued_group_and_is_served_by_it(store):
    leader = lead_and_queue(store, call("u1"))
    follower = call("u1")
    assert admit(store, follower) == [JOINED]
    going = store.start_call(leader)
    assert [f.call_id for f in going.followers] == [follower.call_id]
    assert rows(store, leader)[leader.call_id]["state"] == CALLING and OPEN not in rows(store, leader)


def test_priorities_and_subjects_never_share_a_group(store):
    lead_and_queue(store, call("u1"))
    assert admit(store, call("u1", priority="high"), call("u2")) == [LEAD, LEAD]


def test_a_full_or_old_group_is_not_joined(store, clock):
    leader = lead_and_queue(store, call("u1"))
    assert admit(store, *[call("u1") for _ in range(MAX_FOLLOWERS)]) == [JOINED] * MAX_FOLLOWERS
    assert admit(store, call("u1")) == [LEAD]
    other = lead_and_queue(store, call("u9"))
    clock.now += 3601                                         # older than MAX_EXPECTED_WAIT_HOURS
    assert admit(store, call("u9")) == [LEAD]
    assert len(store.start_call(leader).followers) == MAX_FOLLOWERS
    assert store.start_call(other).followers == []


def test_an_abandoned_pending_group_is_taken_over_after_the_grace(store, clock):
    dead = call("u1")
    store.admit([dead])                                       # its intake died before queueing it
    clock.now += 60
    assert admit(store, call("u1")) == [LEAD]                 # too early to tell: a call of its own
    clock.now += 61
    heir = call("u1")
    [taken] = store.admit([heir])
    assert taken.role == LEAD and rows(store, heir)[OPEN]["leader"] == heir.call_id
    store.mark_queued([taken.item.model_copy(update={"notBefore": 5.0})])
    assert admit(store, call("u1")) == [JOINED]               # joinable once the heir is queued


def test_a_redelivery_is_recognised_and_never_joins_its_first_attempt(store):
    first = call("u1", request_id="11111111-1111-1111-1111-111111111111")
    assert admit(store, first) == [LEAD]
    again = first.model_copy()                                 # the same message delivered again
    [readmitted] = store.admit([again])
    assert readmitted.role == LEAD and readmitted.item.openEtag == rows(store, first)[OPEN].metadata["etag"]


def test_a_redelivery_of_queued_or_joined_calls_books_nothing_again(store):
    leader = lead_and_queue(store, call("u1"), slot=1234.0)
    follower = call("u1")
    store.admit([follower])
    again = store.admit([leader.model_copy(update={"notBefore": None}), follower.model_copy()])
    assert [a.role for a in again] == [ALREADY_QUEUED, ALREADY_QUEUED]
    assert again[0].item.notBefore == 1234.0                  # its request row gets the slot booked then
    store.start_call(leader)
    assert admit(store, leader.model_copy()) == [ALREADY_QUEUED]   # it is going out: not again


def test_a_redelivered_call_whose_group_was_taken_over_is_queued_again(store, clock):
    first = call("u1")
    store.admit([first])
    clock.now += 200
    store.admit([call("u1")])                                  # takes the abandoned group over
    [again] = store.admit([first.model_copy()])
    assert again.role == LEAD and again.item.openEtag is None  # a call of its own now


def test_without_coalescing_every_call_is_its_own(clock):
    store = StatusStore(MemoryTable(), coalesce=False, max_join_age=3600, clock=clock)
    assert admit(store, call("u1"), call("u1")) == [LEAD, LEAD]


def test_an_outage_while_admitting_raises_and_strands_nobody(store, clock):
    calls = [call("u1"), call("u2")]
    seen = []

    def down_after_first_transaction(operation):
        seen.append(operation)
        if seen.count("transaction") > 1:
            raise ServiceRequestError("table down")

    store.table.fault = down_after_first_transaction
    with pytest.raises(StatusStoreUnavailable):
        store.admit(calls)
    store.table.fault = no_fault
    assert admit(store, call(calls[0].subject.objectId)) == [LEAD]   # nobody joins what was left


# -- mark queued --------------------------------------------------------------------------------
def test_marking_queued_keeps_the_open_rows_etag_and_survives_an_outage(store):
    [admitted] = store.admit([call("u1")])
    created = rows(store, admitted.item)[OPEN].metadata["etag"]
    store.mark_queued([admitted.item.model_copy(update={"notBefore": 5.0})])
    assert rows(store, admitted.item)[OPEN].metadata["etag"] == created   # the worker closes in one go
    requests = store.table.requests
    assert store.start_call(admitted.item).followers == [] and store.table.requests == requests + 1
    pending = store.admit([call("u2")])[0].item
    store.table.fault = outage
    store.mark_queued([pending])                              # logged, not raised: nobody may join it
    store.table.fault = no_fault
    assert "eta" not in rows(store, pending)[pending.call_id]
    assert admit(store, call("u2")) == [LEAD]


# -- withdraw -----------------------------------------------------------------------------------
def test_a_refused_leader_leaves_no_rows_and_a_refused_follower_leaves_its_group(store):
    refused = store.admit([call("u1")])
    store.forget(refused)
    assert rows(store, refused[0].item) == {}
    leader = lead_and_queue(store, call("u2"))
    joined = store.admit([call("u2")])
    store.forget(joined)
    assert store.start_call(leader).followers == []
    store.forget(store.admit([call("u3")]) + store.admit([call("u3")]))   # one led, one outside
    assert rows(store, call("u3")) == {}


def test_withdrawing_keeps_what_an_earlier_delivery_queued(store):
    leader = lead_and_queue(store, call("u1"))
    again = store.admit([leader.model_copy()])
    store.forget(again)
    assert rows(store, leader)[OPEN]["leader"] == leader.call_id and "eta" in rows(store, leader)[leader.call_id]
    lead = store.admit([call("u2")])[0]
    store.mark_queued([lead.item.model_copy(update={"notBefore": 1.0})])   # another delivery queued it
    store.forget([lead])
    assert rows(store, lead.item)[OPEN]["leader"] == lead.item.call_id


# -- the worker ---------------------------------------------------------------------------------
def test_close_reads_the_group_when_joins_changed_it_and_again_on_redelivery(store):
    leader = lead_and_queue(store, call("u1"))
    followers = [call("u1") for _ in range(3)]
    store.admit(followers)
    going = store.start_call(leader)
    assert len(going.followers) == 3 and going.openEtag is None
    again = store.start_call(leader)                           # the work message came back
    assert [f.call_id for f in again.followers] == [f.call_id for f in followers]


def test_close_gives_up_when_the_group_keeps_changing(store):
    leader = lead_and_queue(store, call("u1"))
    table = store.table
    real = table.submit_transaction

    def join_in_between(operations):
        operations = list(operations)
        if operations[0][0] == "delete":
            real([merge({"PartitionKey": leader.coalesceKey, "RowKey": OPEN, "touched": 1})])
        return real(operations)

    table.submit_transaction = join_in_between
    with pytest.raises(StatusStoreUnavailable):
        store.start_call(leader)


def test_a_work_item_from_before_status_tracking_passes_through(store):
    old = call("u1")
    assert store.start_call(old) is old
    store.waiting(old, "NoCapacity")
    store.finish(old, [])
    assert store.table.rows == {}


def test_waiting_and_finish_record_the_call_and_everyone_it_served(store):
    from shared.models import ResultMessage

    leader = lead_and_queue(store, call("u1"))
    follower = call("u1")
    store.admit([follower])
    store.waiting(leader.model_copy(update={"notBefore": 77.0}), "TooManyRequests")
    assert rows(store, leader)[leader.call_id]["eta"] == 77.0
    going = store.start_call(leader)
    base = {"servicePrincipalId": SP, "jobId": JOB, "ruleId": RULE, "subject": going.subject, "callIndex": 0,
            "callCount": 1, "attempts": 1, "receivedAt": utcnow(), "completedAt": utcnow(), "result": "Success"}
    store.finish(going, [ResultMessage(resultId=c.call_id, requestId=c.requestId, **base) for c in (going, follower)])
    assert {rows(store, leader)[c.call_id]["state"] for c in (going, follower)} == {"succeeded"}


# -- the table model behaves like the service -------------------------------------------------------
def test_every_write_renews_the_etag_and_stale_etags_are_refused():
    table = MemoryTable()
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "n": 1})
    first = table.get_entity("p", "r").metadata["etag"]
    table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "n": 2})
    assert table.get_entity("p", "r").metadata["etag"] != first
    for stale_write in (merge({"PartitionKey": "p", "RowKey": "r", "n": 3}, etag=first),
                        delete_if_unchanged("p", "r", first)):
        with pytest.raises(TableTransactionError) as stale:
            table.submit_transaction([stale_write])
        assert stale.value.status_code == 412
    assert table.get_entity("p", "r")["n"] == 2
    with pytest.raises(ResourceNotFoundError):
        table.get_entity("p", "missing")


def test_a_transaction_is_all_or_nothing_within_one_partition_and_100_operations():
    table = MemoryTable()
    table.submit_transaction([("create", {"PartitionKey": "p", "RowKey": "a"})])
    with pytest.raises(TableTransactionError) as exists:
        table.submit_transaction([("create", {"PartitionKey": "p", "RowKey": "b"}),
                                  ("create", {"PartitionKey": "p", "RowKey": "a"})])
    assert exists.value.status_code == 409 and ("p", "b") not in table.rows
    with pytest.raises(TableTransactionError) as missing:
        table.submit_transaction([("delete", {"PartitionKey": "p", "RowKey": "zz"})])
    assert missing.value.status_code == 404
    with pytest.raises(ValueError):
        table.submit_transaction([("upsert", {"PartitionKey": "p", "RowKey": "x"}),
                                  ("upsert", {"PartitionKey": "q", "RowKey": "x"})])
    for operations in ([("upsert", {"PartitionKey": "p", "RowKey": str(i)}) for i in range(101)],
                       [("upsert", {"PartitionKey": "p", "RowKey": "x"}), ("delete", {"PartitionKey": "p", "RowKey": "x"})]):
        with pytest.raises(TableTransactionError) as refused:
            table.submit_transaction(operations)
        assert refused.value.status_code == 400
    assert set(table.rows) == {("p", "a")}
    assert len(table.submit_transaction([("upsert", {"PartitionKey": "p", "RowKey": str(i)}) for i in range(100)])) == 100


def test_properties_and_entities_over_their_limits_are_refused_like_the_service():
    from azure.core.exceptions import HttpResponseError

    table = MemoryTable()
    table.upsert_entity({"PartitionKey": "p", "RowKey": "fits", "s": "x" * 32 * 1024})   # 64 KiB in UTF-16
    with pytest.raises(HttpResponseError) as too_long:
        table.upsert_entity({"PartitionKey": "p", "RowKey": "r", "s": "x" * (32 * 1024 + 1)})
    assert (too_long.value.status_code, too_long.value.error_code) == (400, "PropertyValueTooLarge")
    with pytest.raises(TableTransactionError) as too_big:
        table.submit_transaction([("upsert", {"PartitionKey": "p", "RowKey": "r",
                                              **{f"s{i}": "x" * 30_000 for i in range(20)}})])
    assert (too_big.value.status_code, too_big.value.error_code) == (400, "EntityTooLarge")


def test_a_refused_redelivery_keeps_the_followers_of_a_call_already_going_out(store):
    leader = lead_and_queue(store, call("u1"))
    follower = call("u1")
    store.admit([follower])
    store.start_call(leader)                                   # its followers are on its row now
    store.forget(store.admit([leader.model_copy(), follower.model_copy()]))   # a redelivery, refused
    again = store.start_call(leader)                           # its work message ran again
    assert [f.call_id for f in again.followers] == [follower.call_id]


def test_a_refused_redelivery_leaves_the_status_of_calls_already_going_out(store):
    [due_now] = store.admit([call("u1")])                      # sent through the output binding: no slot row
    store.start_call(due_now.item)
    leader = lead_and_queue(store, call("u3"))
    joined = store.admit([call("u3")])[0]
    store.forget(store.admit([due_now.item.model_copy(update={"coalesceKey": None, "openEtag": None}),
                              joined.item.model_copy(update={"coalesceKey": None})]))
    assert rows(store, due_now.item)[due_now.item.call_id]["state"] == CALLING
    assert rows(store, joined.item)[joined.item.call_id]["servedBy"] == leader.call_id


# -- the status answer --------------------------------------------------------------------------
def test_an_overdue_call_says_whether_it_is_known_to_be_queued(store, clock):
    from shared.status.read_model import STALLED_CALLING, STALLED_QUEUED, STALLED_UNCONFIRMED

    assert store.read(str(uuid.uuid4()), 2.0, 30) is None
    queued = lead_and_queue(store, call("u1"), slot=clock.now - 600)
    follower = store.admit([call("u1")])[0].item
    unconfirmed = store.admit([call("u2")])[0].item.model_copy(update={"notBefore": clock.now - 600})
    store.record_requests([(c.requestId, None, "normal", [c]) for c in (queued, follower, unconfirmed)])
    notes = {c.call_id: store.read(c.requestId, 2.0, 30).calls[0] for c in (queued, follower, unconfirmed)}
    assert notes[queued.call_id].note == STALLED_QUEUED and notes[follower.call_id].note == STALLED_QUEUED
    assert notes[follower.call_id].servedBy == queued.call_id
    assert notes[unconfirmed.call_id].stalled and notes[unconfirmed.call_id].note == STALLED_UNCONFIRMED
    store.start_call(queued)
    clock.now += 600
    going = store.read(follower.requestId, 2.0, 30)
    assert going.state == CALLING and going.calls[0].note == STALLED_CALLING
