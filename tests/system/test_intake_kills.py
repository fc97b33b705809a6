"""Issue 13 N1 through devhost: hosts SIGKILLed while intake runs, at the queue door and at the HTTP
door, lose no accepted request: each ends with a result or a dead-letter entry, and its status reads
final. Equal events across messages make coalescing groups that a killed intake could strand.
Uses the scale-out Cluster (3 devhosts on one Azurite, 5 calls per 2 s)."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import httpx
from azure.storage.queue import QueueClient

from scripts.local_stack import start_devhost
from shared.intake.validation import message_request_id
from tests.system.test_scale_out import CALLS, WINDOW, Cluster, user

# `make reliability` runs these longer (RELIABILITY_INTAKE_MESSAGES, RELIABILITY_INTAKE_KILLS).
MESSAGES = int(os.environ.get("RELIABILITY_INTAKE_MESSAGES", "15"))
KILLS = int(os.environ.get("RELIABILITY_INTAKE_KILLS", "4"))
EVENTS_PER_MESSAGE = 4


def kill_hosts_while(c: Cluster, feeding: threading.Thread, rng: random.Random, log_dir) -> int:
    """SIGKILL a random host every 0.3-1.5 s while `feeding` runs (at least KILLS times), restarting it."""
    kills = 0
    while feeding.is_alive() or kills < KILLS:
        time.sleep(rng.uniform(0.3, 1.5))
        victim = rng.choice(c.hosts)
        victim.stop(sig=signal.SIGKILL)
        c.hosts.remove(victim)
        c.hosts.append(start_devhost(c.env, log_dir=log_dir))
        kills += 1
    return kills


def report(door: str, accepted: int, kills: int, lost: list, results: dict[str, list]) -> None:
    duplicates = sum(len(r) - 1 for r in results.values())
    print(f"\nN1 {door}: {accepted} accepted requests, {kills} SIGKILLs during intake, lost {len(lost)}, "
          f"{duplicates} duplicate result(s) (same resultId: at-least-once)")


def results_by(c: Cluster, key: str, wanted: set[str], timeout: float) -> dict[str, list]:
    """Results whose `key` (requestId or correlationId) is wanted, once each has one (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list] = {}
        for m in c.results.matching(lambda m: m.get(key) in wanted):
            found.setdefault(m[key], []).append(m)
        if wanted <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_n1_sigkill_during_intake_at_the_queue_door_loses_nothing(azurite, tmp_path):
    c = Cluster(azurite, tmp_path, hosts=3)
    rng = random.Random(13)
    subjects = [user(500 + i) for i in range(10)]           # few subjects: equal events across messages
    expected: dict[str, str] = {}                            # requestId -> correlationId
    try:
        c.warm_up()
        intake = QueueClient.from_connection_string(azurite.connection_string, c.queues["INTAKE_QUEUE"])

        def feed() -> None:
            for m in range(MESSAGES):
                events = [{"objectId": rng.choice(subjects), "objectTypeName": "User", "correlationId": f"q{m}/{i}"}
                          for i in range(EVENTS_PER_MESSAGE)]
                sent = intake.send_message(json.dumps(events))
                expected.update({message_request_id(sent.id, i): f"q{m}/{i}" for i in range(EVENTS_PER_MESSAGE)})
                time.sleep(0.2)

        feeding = threading.Thread(target=feed)
        feeding.start()
        kills = kill_hosts_while(c, feeding, rng, tmp_path)
        feeding.join()
        # Lost counts events by correlationId, whatever requestIds intake gave them.
        dead = {e.get("correlationId") for letter in c.deadletters.matching(lambda m: m.get("source") == "intake")
                for e in json.loads(letter["original"])}
        wanted = set(expected.values()) - dead
        found = results_by(c, "correlationId", wanted, 120 + 2 * len(wanted))
        lost = sorted(wanted - set(found))
        report("queue door", len(wanted), kills, lost, found)
        assert lost == []
        # Their status, under the requestIds derived from the message, reads final.
        states = c.final_states(sorted(r for r, corr in expected.items() if corr in wanted), timeout=90)
        assert set(states.values()) <= {"succeeded", "skipped"}, states
        assert c.sims.graph.max_in_window(WINDOW) <= CALLS
    finally:
        c.stop()


def test_n1_sigkill_during_intake_at_the_http_door_loses_nothing(azurite, tmp_path):
    c = Cluster(azurite, tmp_path, hosts=3)
    rng = random.Random(17)
    subjects = [user(700 + i) for i in range(10)]
    accepted: list[str] = []
    refused = [0]
    try:
        c.warm_up()

        def client() -> None:
            # A client that retries until it gets a 202 (a new request each time: no Idempotency-Key).
            for n in range(MESSAGES):
                body = [{"objectId": rng.choice(subjects), "objectTypeName": "User", "correlationId": f"h{n}/{i}"}
                        for i in range(EVENTS_PER_MESSAGE)]
                while True:
                    try:
                        response = c.post(body)
                    except (httpx.HTTPError, IndexError):
                        response = None
                    if response is not None and response.status_code == 202:
                        accepted.extend(r["requestId"] for r in response.json()["requests"])
                        break
                    refused[0] += 1
                    time.sleep(0.2)

        feeding = threading.Thread(target=client)
        feeding.start()
        kills = kill_hosts_while(c, feeding, rng, tmp_path)
        feeding.join()
        ids = set(accepted)
        found = results_by(c, "requestId", ids, 120 + 2 * len(ids))
        lost = sorted(ids - set(found))
        report(f"HTTP door ({refused[0]} attempts failed and were retried)", len(ids), kills, lost, found)
        assert lost == []
        states = c.final_states(sorted(ids), timeout=90)
        assert set(states.values()) <= {"succeeded", "skipped"}, states
        assert c.sims.graph.max_in_window(WINDOW) <= CALLS
    finally:
        c.stop()
