"""Issue 13 N1 in process: every accepted request ends in a result or a dead-letter entry, whatever
step intake dies at and whatever table outage starts in the middle. The real intake
(shared/handlers.py) runs against the in-memory table; the host is modelled as Azure's is: a message
whose run failed or whose host died is delivered again, five times at most, then dead-lettered."""
from __future__ import annotations

import json
import uuid

import pytest

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP
from shared import handlers
from shared.models import WorkItem
from shared.status.read_model import STALLED_UNCONFIRMED
from shared.status.rows import FINAL, REQUEST
from tests.unit.coalescing_world import HostCrash, IntakeRuntime, Steps, World

DELIVERIES = handlers.INTAKE_DELIVERIES
SUBJECTS = ["9bb0f679-a883-4a6f-8260-35b491b8b8c8", "5d6d7b8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"]


def event(subject: str, correlation: str) -> dict:
    return {"objectId": subject, "objectTypeName": "User", "servicePrincipalId": EXAMPLE_SP, "jobId": EXAMPLE_JOB,
            "ruleId": EXAMPLE_RULE, "correlationId": correlation}


# Three messages; the first is a bulk post, and every one has an event equal to one of another's.
MESSAGES = {
    "m1": [SUBJECTS[0], SUBJECTS[1], SUBJECTS[0]],
    "m2": [SUBJECTS[0]],
    "m3": [SUBJECTS[1], SUBJECTS[0]],
}


def run(steps: Steps, *, work_between: bool, message_ids: bool = True) -> tuple[World, dict[str, str]]:
    """Deliver the messages round-robin as the host would, workers taking work between deliveries
    when `work_between`, then drain. Returns the world and each message's fate (done/dead-lettered)."""
    world = World()
    rt = IntakeRuntime(world, steps)
    pending = [(name, 1) for name in MESSAGES]
    fate: dict[str, str] = {}
    while pending:
        name, delivery = pending.pop(0)
        body = json.dumps([event(s, f"{name}/{i}") for i, s in enumerate(MESSAGES[name])])
        steps.armed = True
        try:
            due = handlers.intake_message(body, rt, delivery=delivery, message_id=name if message_ids else None)
            steps("output binding")
            for text in due:
                world.send(WorkItem.model_validate_json(text))
            fate[name] = "done"
        except (HostCrash, Exception):  # noqa: BLE001 - the host treats any failure alike: deliver again
            if delivery < DELIVERIES:
                pending.append((name, delivery + 1))
            else:  # the poison sweep dead-letters it with the reason (shared/operations/poison_sweep.py)
                world.dead_letters.append({"source": "intake", "original": body})
                fate[name] = "dead-lettered"
        steps.armed = False
        world.clock.now += 30
        if work_between and world.queue:
            world.work()
    world.clock.now += 600
    world.drain()
    return world, fate


def lost(world: World, fate: dict[str, str]) -> list[str]:
    """Events of accepted messages without a final result, and requests whose status reads unfinished
    without saying that they may never run (allowed only for a dead-lettered message: the
    dead-letter entry is their end)."""
    ended: dict[str, bool] = {}
    problems = []
    for (pk, rk) in list(world.table.rows):
        if rk != REQUEST:
            continue
        status = world.store.read(pk, 2.0, 30)
        ended[status.correlationId] = status.state in FINAL
        honest = fate[status.correlationId.split("/")[0]] == "dead-lettered" and all(
            c.state in FINAL or c.note == STALLED_UNCONFIRMED for c in status.calls)
        if status.state not in FINAL and not honest:
            problems.append(f"{status.correlationId} reads {status.state}: {[c.note for c in status.calls]}")
    wanted = [f"{name}/{i}" for name, subjects in MESSAGES.items() if fate[name] == "done" for i in range(len(subjects))]
    return problems + [c for c in wanted if not ended.get(c)]


def clean_steps() -> int:
    steps = Steps()
    run(steps, work_between=False)
    return steps.count


STEPS = clean_steps()


@pytest.mark.parametrize("work_between", [False, True])
def test_a_crash_at_any_step_of_intake_loses_nothing(work_between):
    duplicates = 0
    for crash_at in range(1, STEPS + 1):
        world, fate = run(Steps(crash_at=crash_at), work_between=work_between)
        assert set(fate.values()) == {"done"}
        assert lost(world, fate) == [], f"crash at step {crash_at}"
        assert world.stranded_followers() == []
        duplicates += sum(n - 1 for n in world.results().values())
    print(f"{STEPS} crash points, {duplicates} duplicate results (same resultId)")


@pytest.mark.parametrize("length", [1, 3, 10_000])
def test_a_table_outage_starting_at_any_step_loses_nothing(length):
    for outage_at in range(1, STEPS + 1):
        world, fate = run(Steps(outage_at=outage_at, outage_length=length), work_between=True)
        assert lost(world, fate) == [], f"outage from step {outage_at} for {length} requests"
        assert all(f in ("done", "dead-lettered") for f in fate.values())
        dead = {json.loads(d["original"])[0]["correlationId"].split("/")[0] for d in world.dead_letters}
        assert dead == {n for n, f in fate.items() if f == "dead-lettered"}


def test_without_derived_ids_a_redelivery_would_lose_requests():
    """The checker can fail: with random ids on redelivery, the first attempt's requests read queued for ever."""
    found = [crash_at for crash_at in range(1, STEPS + 1)
             if lost(*run(Steps(crash_at=crash_at), work_between=False, message_ids=False))]
    assert found


def test_every_call_of_a_clean_run_is_served_once_and_coalescing_saves_calls():
    world, _ = run(Steps(), work_between=False)
    results = world.results()
    assert set(results.values()) == {1} and len(results) == sum(map(len, MESSAGES.values()))
    followers = sum(1 for s in world.served if s.served_by)
    assert world.graph_calls + followers == len(results) and followers > 0
    assert uuid.UUID(next(iter(results)).split(":")[0])


def test_queue_door_request_ids_are_derived_from_the_message_and_http_ids_are_random():
    from shared.intake.validation import accept
    from shared.settings import Settings

    s = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true")
    body = json.dumps([event(SUBJECTS[0], "a"), event(SUBJECTS[0], "b")])
    first, again = (accept(body, s, message_id="msg-1") for _ in range(2))
    assert [r.requestId for r in first] == [r.requestId for r in again]
    assert len({r.requestId for r in first} | {r.requestId for r in accept(body, s, message_id="msg-2")}) == 4
    assert {r.requestId for r in accept(body, s)}.isdisjoint(r.requestId for r in accept(body, s))
    assert all(item.requestId == r.requestId for r in first for item in r.items)
