"""The cost of a status read is bounded (issue 13 N3): GET /api/provision/{id} reads the request
rows and at most CALLS_PER_PAGE call rows, whatever the request's size, on the in-memory table."""
from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest

from shared import handlers
from shared.models import Subject, WorkItem, utcnow
from shared.settings import Settings
from shared.status.read_model import CALLS_PER_PAGE
from shared.status.store import StatusStore
from tests.fakes import Clock, MemoryTable

SP, JOB, RULE = "c8c95753-f628-48e1-9fab-76c2d4cf624c", "job1", "rule1"
CALLS = 1000  # MAX_CALLS_PER_POST's default: the largest request a post can make


class CountingTable(MemoryTable):
    """The in-memory table, counting the point reads a status read makes."""

    def __init__(self):
        super().__init__()
        self.point_reads = 0

    def get_entity(self, partition_key: str, row_key: str):
        self.point_reads += 1
        return super().get_entity(partition_key, row_key)


def queued_request(store: StatusStore, calls: int, clock: Clock) -> str:
    request_id = str(uuid.uuid4())
    items = [WorkItem(requestId=request_id, callIndex=i, servicePrincipalId=SP, jobId=JOB, ruleId=RULE,
                      subject=Subject(objectId=str(uuid.uuid4()), objectTypeName="User"), receivedAt=utcnow())
             for i in range(calls)]
    admitted = [a.item.model_copy(update={"notBefore": clock.now + 2 * a.item.callIndex})
                for a in store.admit(items)]
    store.mark_queued(admitted)
    store.record_requests([(request_id, "hr-1", "normal", admitted)])
    return request_id


@pytest.fixture(scope="module")
def admitted():
    """One 1000-call request, admitted once for the module: every test only reads it."""
    clock = Clock()
    clock.now = 1_000_000.0
    table = CountingTable()
    store = StatusStore(table, coalesce=True, max_join_age=3600, clock=clock)
    return SimpleNamespace(clock=clock, table=table, store=store, request_id=queued_request(store, CALLS, clock))


@pytest.fixture
def world(admitted):
    rt = SimpleNamespace(settings=Settings(AzureWebJobsStorage="UseDevelopmentStorage=true"), status=admitted.store)
    return SimpleNamespace(**vars(admitted), rt=rt)


def get(world, params: dict | None = None, request_id: str | None = None):
    world.table.point_reads = 0
    reply = handlers.request_status(request_id or world.request_id, world.rt, params)
    return reply, json.loads(reply.json())


def test_a_status_read_of_a_1000_call_request_reads_at_most_one_page_of_call_rows(world):
    reply, body = get(world)
    assert reply.status == 200 and world.table.point_reads <= CALLS_PER_PAGE
    assert [c["callIndex"] for c in body["calls"]] == list(range(CALLS_PER_PAGE))
    assert (body["callCount"], body["page"], body["pageCount"], body["nextPage"]) == (CALLS, 1, 10, 2)


def test_every_page_together_lists_each_call_once(world):
    seen, page = [], 1
    while page:
        reply, body = get(world, {"page": str(page)})
        assert reply.status == 200 and world.table.point_reads <= CALLS_PER_PAGE
        seen += [c["callIndex"] for c in body["calls"]]
        page = body.get("nextPage")
    assert seen == list(range(CALLS))


def test_the_last_page_says_there_is_no_next_one_and_its_eta_is_its_own(world):
    _, body = get(world, {"Page": "10"})
    assert "nextPage" not in body and body["calls"][-1]["callIndex"] == CALLS - 1
    assert body["eta"] == body["calls"][-1]["eta"]


@pytest.mark.parametrize("page", ["0", "-1", "two", "1.5", "", "11"])
def test_a_page_that_is_not_there_is_a_clear_400(world, page):
    reply, body = get(world, {"page": page})
    assert reply.status == 400 and body["error"]["code"] == "InvalidPage"
    assert body["error"]["details"][0]["field"] == "page"


def test_a_small_request_is_one_page_and_unknown_requests_still_404(world):
    small = queued_request(world.store, 3, world.clock)
    _, body = get(world, request_id=small)
    assert (len(body["calls"]), body["pageCount"], body.get("nextPage")) == (3, 1, None)
    reply, body = get(world, {"page": "2"}, request_id=str(uuid.uuid4()))
    assert reply.status == 404 and body["error"]["code"] == "RequestNotFound"


def test_callback_states_are_those_of_the_calls_on_the_page(world):
    from shared.models import CallbackState

    ledger = [CallbackState(resultId=f"{world.request_id}:{i}", state="delivered", host="hr.example.com",
                              updatedAt=utcnow())
              for i in range(CALLS)]
    world.rt.settings = world.rt.settings.model_copy(update={"callback_allowed_hosts": "hr.example.com"})
    world.rt.callbacks = SimpleNamespace(states=lambda request_id: ledger if request_id == world.request_id else [])
    _, body = get(world, {"page": "3"})
    assert [c["resultId"] for c in body["callbacks"]] == [f"{world.request_id}:{i}" for i in range(200, 300)]
