"""Property tests of the coalescing protocol on the in-memory table: random interleavings of admit
(join), close, finish, take-over, withdraw, worker deaths and redelivered (or refused) intake over a few equal
requests. Intake here is the protocol's own sequence (admit; send the leader's work; mark it queued),
with the host dying after any of its steps; tests/unit/test_intake_crash.py runs the real handlers."""
from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.models import Subject, WorkItem, utcnow
from shared.status.admission import LEAD
from tests.unit.coalescing_world import World

SUBJECTS = ["a", "b"]

operations = st.lists(st.one_of(
    st.tuples(st.just("post"), st.sampled_from(SUBJECTS), st.sampled_from([None, "after-admit", "after-send"])),
    st.tuples(st.just("redeliver"), st.integers(0, 20)),
    st.tuples(st.just("refuse"), st.sampled_from(SUBJECTS)),
    st.tuples(st.just("again"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("work"), st.integers(0, 20)),
    st.tuples(st.just("worker-dies"), st.integers(0, 20)),
    st.tuples(st.just("tick"), st.sampled_from([1, 60, 150])),
), max_size=40)


def call(subject: str) -> WorkItem:
    return WorkItem(requestId=str(uuid.uuid4()), servicePrincipalId="c8c95753-f628-48e1-9fab-76c2d4cf624c",
                    jobId="job", ruleId="rule", subject=Subject(objectId=subject, objectTypeName="User"),
                    receivedAt=utcnow())


def intake(world: World, item: WorkItem, crash: str | None) -> bool:
    """The protocol's intake; False when the host died on the way (the message comes back)."""
    [admitted] = world.store.admit([item])
    if admitted.role != LEAD:
        return True
    if crash == "after-admit":
        return False
    placed = admitted.item.model_copy(update={"notBefore": world.clock.now + 30})
    world.send(placed)
    if crash == "after-send":
        return False
    world.store.mark_queued([placed])
    return True


class Model:
    def __init__(self) -> None:
        self.world = World()
        self.accepted: list[WorkItem] = []
        self.refused: list[WorkItem] = []
        self.crashed: list[WorkItem] = []

    def apply(self, op: tuple) -> None:
        world, kind = self.world, op[0]
        if kind == "post":
            item = call(op[1])
            self.accepted.append(item)
            if not intake(world, item, op[2]):
                self.crashed.append(item)
        elif kind == "redeliver" and self.crashed:
            item = self.crashed.pop(op[1] % len(self.crashed))
            intake(world, item.model_copy(), None)
        elif kind == "again" and self.accepted:
            # A message delivered once more (its host died before deleting it); this run may be refused
            # (a backlog), which dead-letters the message: the request ends there, whatever ran.
            item = self.accepted[op[1] % len(self.accepted)]
            if not op[2]:
                intake(world, item.model_copy(), None)
            elif item not in self.crashed:
                self.accepted.remove(item)
                world.store.forget(world.store.admit([item.model_copy()]))
        elif kind == "refuse":
            item = call(op[1])
            self.refused.append(item)
            world.store.forget(world.store.admit([item]))
        elif kind == "work" and world.queue:
            world.work(op[1])
        elif kind == "worker-dies" and world.queue:
            # The worker closed the group and died before the call: the message comes back.
            world.store.start_call(WorkItem.model_validate_json(world.queue[op[1] % len(world.queue)]))
        elif kind == "tick":
            world.clock.now += op[1]

    def finish(self) -> None:
        for item in self.crashed:                           # the host delivers every message again
            intake(self.world, item.model_copy(), None)
        self.world.clock.now += 600
        self.world.drain()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_every_admitted_request_ends_with_one_result_and_nobody_waits_on_an_unqueued_call(ops):
    model = Model()
    for op in ops:
        model.apply(op)
        assert model.world.stranded_followers() == [], op
    model.finish()
    world = model.world
    results = world.results()
    for item in model.accepted:
        assert results[item.call_id] >= 1, f"{item.call_id} lost"
        servers = {s.served_by for s in world.served if s.call_id == item.call_id}
        assert len(servers) == 1, f"{item.call_id} served by its own call and as a follower: {servers}"
        if results[item.call_id] > 1:                       # at-least-once: only a work message sent twice
            assert world.sends[servers.pop() or item.call_id] >= 2
    assert all(results[item.call_id] == 0 for item in model.refused)
    accepted = {item.call_id for item in model.accepted}
    followers = {s.call_id for s in world.served if s.served_by and s.call_id in accepted}
    own_calls = {s.call_id for s in world.served if not s.served_by and s.call_id in accepted}
    assert len(followers) + len(own_calls) == len(accepted)                # calls saved = followers served
    if not any(op[0] == "again" or op[0] == "post" and op[2] == "after-send" for op in ops):
        assert set(results.values()) <= {1} and world.graph_calls == len(own_calls)
