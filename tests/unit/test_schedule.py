"""Slot booking on the shared timeline, against the in-memory queue model."""
import random

import pytest

from shared.errors import BacklogTooLong
from shared.ratelimit.slot_timeline import Schedule
from tests.fakes import Clock, SimulatedQueue


def schedule(clock, spacing=2.0):
    return Schedule(SimulatedQueue(clock, random.Random(1)), spacing, clock=clock, sleep=lambda s: None)


def test_bookings_are_consecutive_and_never_overlap():
    clock = Clock()
    clock.now = 1000.0
    s = schedule(clock)
    first = s.book(3)
    second = s.book(2)
    assert first.slots == [1000.0, 1002.0, 1004.0]
    assert second.slots == [1006.0, 1008.0]


def test_an_idle_timeline_books_from_now_and_respects_earliest():
    clock = Clock()
    s = schedule(clock)
    clock.now = 50.0
    assert s.book(1).slots == [50.0]
    clock.now = 500.0          # the horizon is long past
    assert s.book(1, earliest=530.0).slots == [530.0]
    assert s.book(1).slots == [532.0]


def test_too_long_refuses_without_booking():
    clock = Clock()
    s = schedule(clock)
    s.book(10)                  # 20 s of work
    with pytest.raises(BacklogTooLong) as refused:
        s.book(5, max_wait=25)
    assert refused.value.wait > 25
    assert s.book(1).slots == [20.0]   # nothing was taken by the refused booking


def test_racing_creators_are_merged_into_one_timeline():
    clock = Clock()
    s = schedule(clock)
    s.store.send('{"horizon": 10.0}', 0)
    s.store.send('{"horizon": 30.0}', 0)
    assert s.book(1).slots == [30.0]
    assert len(s.store.messages) == 1


def test_a_timeline_held_by_another_booker_is_waited_for_briefly():
    clock = Clock()
    store = SimulatedQueue(clock, random.Random(2))
    s = Schedule(store, 1.0, clock=clock, sleep=lambda seconds: setattr(clock, "now", clock.now + seconds))
    s.book(1)
    held = store.receive(5)     # another instance holds it for up to 5 s
    assert held
    booking = s.book(1)         # we wait out its hold (simulated) and still get a slot after its horizon
    assert booking.slots[0] >= 1.0


def test_a_high_call_goes_ahead_of_the_normal_backlog_and_keeps_the_total_at_the_rate():
    clock = Clock()
    clock.now = 100.0
    s = schedule(clock)
    s.book(10)                                   # normal backlog: slots 100 .. 118, horizon 120
    clock.now = 103.0
    high = s.book(1, lane="high")
    assert high.slots == [104.0]                 # the next slot on the normal grid, not after 120
    assert s.book(1).slots == [122.0]            # the normal lane moved one slot back for it


def test_high_calls_take_at_most_their_share_while_normal_calls_wait():
    clock = Clock()
    clock.now = 0.0
    s = Schedule(SimulatedQueue(clock, random.Random(1)), 2.0, clock=clock, sleep=lambda _: None, high_share=0.5)
    s.book(100)                                  # 200 s of normal backlog
    slots = [s.book(1, lane="high").slots[0] for _ in range(20)]
    assert slots == sorted(set(slots))           # distinct, in order, on the grid
    assert all(slot % 2.0 == 0 for slot in slots)
    # Over the span the high lane covers, normal calls keep at least half of the slots.
    span = (slots[-1] - slots[0]) / 2.0 + 1
    assert len(slots) / span <= 0.5 + 1 / span


def test_without_a_normal_backlog_high_calls_run_at_the_full_rate_and_normal_ones_follow():
    clock = Clock()
    clock.now = 10.0
    s = schedule(clock)
    assert s.book(3, lane="high").slots == [10.0, 12.0, 14.0]
    assert s.book(1).slots == [16.0]
