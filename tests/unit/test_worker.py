"""The worker in process: every branch of shared/worker.py on a simulated clock, with the real
RateGate, Schedule and placement on in-memory queues that behave like the real ones (whole-second
visibility, pop receipts renewed on every update), and a Graph stand-in that writes each request
through the real SendTiming hook. Nothing of our own is mocked away."""
from __future__ import annotations

import json
import math
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import GraphFailure, StatusStoreUnavailable
from shared.graph.client import SendTiming
from shared.graph.retry_policy import MAX_RETRY_AFTER_SECONDS, parse_retry_after
from shared.models import GraphKeyValue, ResultMessage, Subject, WorkItem
from shared.ratelimit.placement import place, place_now
from shared.ratelimit.slot_timeline import Schedule
from shared.ratelimit.token_gate import MAX_VISIBILITY_SECONDS, RateGate
from shared.settings import Settings
from shared.worker import process
from tests.fakes import Clock, SimulatedQueue, max_in_window

GOLDEN = Path(__file__).resolve().parents[2] / "simulators" / "golden"
SKIPPED = GraphKeyValue.model_validate(json.loads((GOLDEN / "example1_user_skipped.json").read_text())["response"])
HEADERS, BODY = "http11.send_request_headers.started", "http11.send_request_body.complete"
START = 1_800_000_000.0
SETTINGS = Settings.model_validate({
    "AzureWebJobsStorage": "UseDevelopmentStorage=true", "RATE_LIMIT_CALLS": "5", "RATE_LIMIT_WINDOW_SECONDS": "10",
    "RATE_LIMIT_MARGIN_SECONDS": "0.5", "MAX_ATTEMPTS": "3", "RETRY_BASE_SECONDS": "5", "RETRY_MAX_SECONDS": "900"})
WORK, DEAD = SETTINGS.work_queue, SETTINGS.deadletter_queue


class Queues:
    """Named queues, each a SimulatedQueue: what the worker sends is what a later poll finds."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.named: dict[str, SimulatedQueue] = {}

    def queue(self, name: str) -> SimulatedQueue:
        return self.named.setdefault(name, SimulatedQueue(self.clock, random.Random(len(self.named))))

    def send_text(self, name: str, text: str, *, delay: int = 0) -> None:
        self.queue(name).send(text, delay)

    def send_json(self, name: str, body, *, delay: int = 0) -> None:
        self.send_text(name, body.model_dump_json(exclude_none=True) if hasattr(body, "model_dump_json")
                       else json.dumps(body), delay=delay)

    def texts(self, name: str) -> list[dict]:
        return [json.loads(m.content) for m in self.queue(name).messages.values()]


class Graph:
    """provisionOnDemand as the wire sees it: the hook runs, then the body is written, then the answer."""

    def __init__(self, clock: Clock, answer: Callable[[WorkItem], GraphKeyValue | GraphFailure] = lambda _: SKIPPED):
        self.clock = clock
        self.answer = answer
        self.identity_up = True
        self.stall = 0.0          # seconds lost between taking the token and writing the request
        self.latency = 0.6        # from the request written to the answer
        self.arrivals: list[tuple[float, str]] = []

    def token(self) -> str:
        if not self.identity_up:
            raise GraphFailure.of("transient", "IdentityUnavailable", "could not get a managed identity token")
        return "graph-token"

    def provision_on_demand(self, item: WorkItem, token: str, timing: SendTiming) -> GraphKeyValue:
        self.clock.sleep(self.stall)
        timing.trace(HEADERS, {})
        timing.trace(BODY, {})
        self.arrivals.append((self.clock.now, item.subject.objectId))
        self.clock.sleep(self.latency)
        answer = self.answer(item)
        if isinstance(answer, GraphFailure):
            answer.timing = timing
            raise answer
        return answer


class Status:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stall = 0.0  # a slow table write (SDK retries, 300 s read timeout)
        self.down = False
        self.events: list[tuple] = []

    def start_call(self, item: WorkItem) -> WorkItem:
        self.clock.sleep(self.stall)
        if self.down:
            raise StatusStoreUnavailable("table unreachable")
        self.events.append(("calling", item.call_id))
        return item

    def waiting(self, item: WorkItem, reason: str) -> None:
        self.events.append(("waiting", item.call_id, reason, item.notBefore))

    def finish(self, item: WorkItem, results: list[ResultMessage]) -> None:
        self.events.append(("finish", item.call_id, results[0].result))


class Sink:
    def __init__(self) -> None:
        self.results: list[ResultMessage] = []

    def emit(self, result: ResultMessage) -> None:
        self.results.append(result)


class JoinTimer:
    """The release timer, fired when the worker joins it (after the answer): conservative."""

    def __init__(self, fn, args):
        self.fn, self.args, self.done = fn, args, False

    def join(self) -> None:
        if not self.done:
            self.done = True
            self.fn(*self.args)


class FakeRuntime:
    """The Runtime Protocol in process."""

    def __init__(self, clock: Clock, settings: Settings = SETTINGS):
        self.clock = clock
        self.settings = settings
        self.queues = Queues(clock)
        self.graph = Graph(clock)
        self.sinks = [Sink()]
        self.status = Status(clock)
        self.pool = SimulatedQueue(clock, random.Random(7))
        s = settings
        self.gate = RateGate(self.pool, s.rate_limit_calls, s.rate_limit_window_seconds, s.rate_limit_margin_seconds,
                             s.graph_timeout_seconds, clock=clock, wall=clock,
                             start_timer=lambda delay, fn, *args: JoinTimer(fn, args))
        self.schedule = Schedule(SimulatedQueue(clock, random.Random(8)), s.slot_spacing, clock=clock,
                                 sleep=clock.sleep, high_share=s.high_priority_share)

    def pool_name(self, item: WorkItem | None = None) -> str:
        return "pool"

    def gate_for(self, item: WorkItem | None = None) -> RateGate:
        return self.gate

    def schedule_for(self, item: WorkItem | None = None) -> Schedule:
        return self.schedule

    @property
    def results(self) -> list[ResultMessage]:
        return self.sinks[0].results

    def ready(self) -> "FakeRuntime":
        """A seeded pool whose tokens are usable."""
        self.gate.ensure_pool()
        self.clock.now += math.ceil(self.gate.window + self.gate.margin + self.gate.epoch_ttl) + 1
        return self

    def run(self, item: WorkItem) -> None:
        process(item, self, clock=self.clock, sleep=self.clock.sleep)

    def drain(self, until: float, arriving: list[tuple[float, WorkItem]] = ()) -> None:
        """The host: it runs every visible message at once, so the calls go in the order of their
        slots; here one at a time in that order, the others handed back for the next poll.
        `arriving` are new requests, booked at their time as intake does."""
        work = self.queues.queue(WORK)
        arriving = sorted(arriving, key=lambda a: a[0])
        while self.clock.now < until and (work.messages or arriving):
            while arriving and arriving[0][0] <= self.clock.now:
                place_now([arriving.pop(0)[1]], self, clock=self.clock)
            got = sorted(work.receive(30, max_count=32), key=lambda m: json.loads(m.content).get("notBefore") or 0)
            if not got:
                due = [m.visible_at for m in work.messages.values()] + [a[0] for a in arriving[:1]]
                self.clock.now = max(self.clock.now + 0.1, min(due))
                continue
            for other in got[1:]:
                work.update(other, 0)
            work.delete(got[0])
            self.run(WorkItem.model_validate_json(got[0].content))


def item(n: int = 0, **fields) -> WorkItem:
    return WorkItem(requestId=f"req-{n}", servicePrincipalId="sp", jobId="job", ruleId="rule",
                    subject=Subject(objectId=f"user-{n}", objectTypeName="User"),
                    receivedAt=datetime(2026, 11, 30, tzinfo=timezone.utc), **fields)


def fresh() -> FakeRuntime:
    return FakeRuntime(Clock(START)).ready()


def on_slot(rt: FakeRuntime, n: int = 0, **fields) -> WorkItem:
    """An item booked and due now, as the host delivers it."""
    placed = place([item(n, **fields)], rt, clock=rt.clock)
    assert placed.due
    return placed.booked[0]


def visible_tokens(rt: FakeRuntime, after: float) -> int:
    return sum(m.visible_at <= rt.clock.now + after for m in rt.pool.messages.values())


# -- the happy path and the slot ----------------------------------------------------------------

def test_a_call_on_its_slot_goes_out_and_its_result_is_decoded():
    rt = fresh()
    rt.run(on_slot(rt))
    assert [r.result for r in rt.results] == ["Skipped"] and rt.results[0].attempts == 1
    assert rt.status.events[0] == ("calling", "req-0:0") and rt.status.events[-1][0] == "finish"
    assert visible_tokens(rt, 0) == 4                  # its token is back, hidden for a window
    assert visible_tokens(rt, rt.gate.window + rt.gate.margin + 1) == 5


def test_an_item_that_surfaces_well_before_its_slot_goes_back_under_cover_without_a_token():
    rt = fresh()
    early = item(notBefore=rt.clock.now + 60)
    rt.run(early)
    assert not rt.graph.arrivals and visible_tokens(rt, 0) == 5
    (back,) = rt.queues.queue(WORK).messages.values()
    assert json.loads(back.content)["notBefore"] == early.notBefore and back.visible_at > rt.clock.now + 50


def test_an_unbooked_item_books_its_slot_when_it_surfaces():
    rt = fresh()
    rt.schedule.book(10)                               # a backlog of 10 calls ahead of it
    rt.run(item())
    assert not rt.graph.arrivals
    (booked,) = rt.queues.texts(WORK)
    assert booked["notBefore"] >= rt.clock.now + 9 * SETTINGS.slot_spacing


# -- each way a call can fail -------------------------------------------------------------------

def test_identity_endpoint_down_waits_without_capacity_or_an_attempt():
    rt = fresh()
    rt.graph.identity_up = False
    rt.run(on_slot(rt))
    assert not rt.graph.arrivals and visible_tokens(rt, 0) == 5
    (again,) = rt.queues.queue(WORK).messages.values()
    body = json.loads(again.content)
    assert body["attempts"] == 0 and body["deferrals"] == 1 and "notBefore" not in body
    assert again.visible_at >= rt.clock.now + SETTINGS.retry_base_seconds / 2
    assert rt.status.events[-1][:3] == ("waiting", "req-0:0", "IdentityUnavailable")


def test_status_store_down_waits_without_capacity_or_an_attempt():
    rt = fresh()
    rt.status.down = True
    rt.run(on_slot(rt))
    assert not rt.graph.arrivals and visible_tokens(rt, 0) == 5
    assert rt.queues.texts(WORK)[0]["attempts"] == 0
    assert rt.status.events[-1][:3] == ("waiting", "req-0:0", "StatusStoreUnavailable")


def test_no_token_on_its_slot_rebooks_it_at_the_end_of_the_backlog():
    rt = fresh()
    taken = [rt.gate.acquire() for _ in range(5)]      # another instance holds every token
    assert all(taken)
    mine = on_slot(rt)
    rt.run(mine)
    assert not rt.graph.arrivals
    (again,) = rt.queues.texts(WORK)
    assert again["displaced"] == 1 and again["notBefore"] > mine.notBefore and again["attempts"] == 0
    assert rt.status.events[-1][2] == "NoCapacity"


@pytest.mark.parametrize("retry_after, pause", [("30", 30.0), (None, 10.0)])
def test_a_429_stops_every_token_for_the_retry_after(retry_after, pause):
    rt = fresh()
    rt.graph.answer = lambda _: GraphFailure.of("transient", "TooManyRequests", "slow down", 429,
                                                parse_retry_after(retry_after))
    rt.run(on_slot(rt))
    throttled_at = rt.clock.now
    assert len(rt.graph.arrivals) == 1 and rt.queues.texts(WORK)[0]["attempts"] == 1
    # No token of the pool can start a call before the pause is over, whoever asks.
    other = RateGate(rt.pool, 5, 10, 0.5, 30, clock=rt.clock, wall=rt.clock)
    while rt.clock.now < throttled_at + pause - 0.5:
        assert other.acquire() is None
        rt.clock.now += 0.5
    assert rt.schedule.book(1).slots[0] >= throttled_at + pause   # new bookings start after it too
    rt.graph.answer = lambda _: SKIPPED
    rt.drain(until=throttled_at + 120)
    assert len(rt.graph.arrivals) == 2 and rt.graph.arrivals[1][0] >= throttled_at + pause
    assert rt.results[0].attempts == 2


def test_a_transient_failure_is_retried_and_then_given_up():
    rt = fresh()
    rt.graph.answer = lambda _: GraphFailure.of("transient", "ServiceUnavailable", "try later", 503)
    rt.run(on_slot(rt))
    rt.drain(until=rt.clock.now + 3600)
    assert len(rt.graph.arrivals) == SETTINGS.max_attempts
    (dead,) = rt.queues.texts(DEAD)
    assert dead["reason"]["code"] == "ServiceUnavailable" and "gave up after 3 attempts" in dead["reason"]["message"]
    assert [r.result for r in rt.results] == ["Error"] and rt.results[0].attempts == SETTINGS.max_attempts


def test_a_permanent_failure_is_dead_lettered_at_once():
    rt = fresh()
    rt.graph.answer = lambda _: GraphFailure.of("permanent", "Authorization_RequestDenied", "no", 403)
    rt.run(on_slot(rt))
    assert len(rt.graph.arrivals) == 1 and not rt.queues.texts(WORK)
    assert rt.queues.texts(DEAD)[0]["reason"]["code"] == "Authorization_RequestDenied"
    assert rt.results[0].result == "Error" and rt.status.events[-1] == ("finish", "req-0:0", "Error")
    assert visible_tokens(rt, rt.gate.window + rt.gate.margin + 1) == 5


@pytest.mark.parametrize("stall", [60.0, 300.0])
def test_a_stall_before_the_request_is_written_sends_nothing_and_requeues_it(stall):
    rt = fresh()
    rt.graph.stall = stall
    rt.run(on_slot(rt))
    assert not rt.graph.arrivals and not rt.results
    (again,) = rt.queues.texts(WORK)
    assert again["attempts"] == 0 and rt.status.events[-1][2] == "LeaseExpired"


def test_a_status_write_slower_than_the_hold_costs_no_token_and_no_call():
    """R1: no storage round trip between taking a token and sending: the calling stamp is
    written before the token is taken, so however slow it is, the call still goes out."""
    rt = fresh()
    rt.status.stall = 120.0
    rt.run(on_slot(rt))
    assert len(rt.graph.arrivals) == 1 and rt.results[0].result == "Skipped"


# -- R4: one failing call never delays the others ----------------------------------------------

@pytest.mark.parametrize("retry_after", [None, "3600", "1e12", "inf", "-3", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_subject_failing_on_every_attempt_never_slows_a_backlog_of_100(retry_after):
    rt = fresh()
    settings = Settings.model_validate({**{k: str(v) for k, v in {
        "AzureWebJobsStorage": "UseDevelopmentStorage=true", "RATE_LIMIT_CALLS": 5, "RATE_LIMIT_WINDOW_SECONDS": 10,
        "RATE_LIMIT_MARGIN_SECONDS": 0.5, "MAX_ATTEMPTS": 100, "RETRY_BASE_SECONDS": 5,
        "RETRY_MAX_SECONDS": 900}.items()}})
    rt.settings = settings
    failing = "user-0"
    rt.graph.answer = lambda it: (GraphFailure.of("transient", "InternalServerError", "boom", 500,
                                                  parse_retry_after(retry_after))
                                  if it.subject.objectId == failing else SKIPPED)
    start = rt.clock.now
    spacing = settings.slot_spacing
    place_now([item(n) for n in range(21)], rt, clock=rt.clock)  # the failing call and a backlog of 20
    stream = [(start + i * spacing * 0.9, item(21 + i)) for i in range(80)]  # 80 more, a little faster than the rate
    rt.drain(until=start + 400, arriving=stream)
    others = sorted(t for t, who in rt.graph.arrivals if who != failing)
    assert len(others) == 100, "the backlog was held up"
    # Every other call went at the rate: behind the backlog only, and the failing call's own
    # attempts (each takes a slot when it is made; backoff 2.5 s .. 900 s gives at most 7 in 400 s).
    assert others[-1] - start <= (101 + 7) * spacing + settings.schedule_lead_seconds
    assert max_in_window([t for t, _ in rt.graph.arrivals], 10) <= 5
    for message in rt.queues.queue(WORK).messages.values():   # the failing call waits, hidden at most 7 days
        assert message.visible_at - rt.clock.now <= MAX_VISIBILITY_SECONDS


@given(st.one_of(st.none(), st.text(max_size=40), st.floats(allow_nan=True, allow_infinity=True).map(str),
                 st.integers(-10**30, 10**30).map(str)))
def test_any_retry_after_is_a_finite_wait_within_the_cap(value):
    seconds = parse_retry_after(value)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER_SECONDS
