"""Issue 13 N1 through devhost: hosts SIGKILLed while intake runs, at the queue door, at the HTTP
door and through fast intake (FAST_INTAKE=true: the HTTP door queues envelopes the queue door
admits), lose no accepted request: each ends with a result or a dead-letter entry, and its status
reads final. Equal events across messages make coalescing groups that a killed intake could strand.
Uses the scale-out Cluster (3 devhosts on one Azurite, 5 calls per 2 s)."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import defaultdict
from typing import Callable

import httpx
from azure.storage.queue import QueueClient

from scripts.local_stack import DevHost, start_devhost
from shared.intake.validation import message_request_id
from tests.system.test_scale_out import CALLS, WINDOW, Cluster, user

# `make reliability` runs these longer (RELIABILITY_INTAKE_MESSAGES, RELIABILITY_INTAKE_KILLS).
MESSAGES = int(os.environ.get("RELIABILITY_INTAKE_MESSAGES", "15"))
KILLS = int(os.environ.get("RELIABILITY_INTAKE_KILLS", "4"))
EVENTS_PER_MESSAGE = 4


def kill_hosts_while(c: Cluster, feeding: threading.Thread, rng: random.Random, log_dir,
                     pick: Callable[[int], DevHost | None] = lambda kill: None) -> int:
    """SIGKILL a host every 0.3-1.5 s while `feeding` runs (at least KILLS times), restarting it: the
    one `pick` names for that kill, else a random one."""
    kills = 0
    while feeding.is_alive() or kills < KILLS:
        time.sleep(rng.uniform(0.3, 1.5))
        victim = pick(kills)
        victim = victim if victim in c.hosts else rng.choice(c.hosts)
        victim.stop(sig=signal.SIGKILL)
        c.hosts.remove(victim)
        c.hosts.append(start_devhost(c.env, log_dir=log_dir))
        kills += 1
    return kills


def report(door: str, accepted: int, kills: int, lost: list, results: dict[str, list], more: str = "") -> None:
    duplicates = sum(len(r) - 1 for r in results.values())
    print(f"\nN1 {door}: {accepted} accepted requests, {kills} SIGKILLs during intake, lost {len(lost)}, "
          f"{duplicates} duplicate result(s) (same resultId: at-least-once){more}")


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


def post_to_a_live_host(c: Cluster, body, hosts: dict[str, DevHost | None]) -> httpx.Response | None:
    """POST to a random running host, named hosts["serving"] while the post is under way and
    hosts["answered"] once it answered 202; None when the host died under it (or none runs just now)."""
    live = [h for h in c.hosts if h.process.poll() is None]
    if not live:
        return None
    hosts["serving"] = host = random.choice(live)
    try:
        response = httpx.post(f"{host.url}/api/provision", json=body, timeout=30)
    except httpx.HTTPError:
        return None
    finally:
        hosts["serving"] = None
    hosts["answered"] = host if response.status_code == 202 else hosts["answered"]
    return response


def enveloped_ids(letters: list[dict]) -> set[str]:
    """The requestIds of the envelopes among intake dead letters."""
    ids = set()
    for letter in letters:
        try:
            original = json.loads(letter["original"])
        except ValueError:
            continue
        ids |= {r["requestId"] for r in original.get("requests", [])} if isinstance(original, dict) else set()
    return ids


def graph_calls(c: Cluster) -> dict[str, list[str]]:
    """Subject -> the requestId (client-request-id) of each provisionOnDemand call that reached Graph."""
    calls = defaultdict(list)
    for call in c.sims.graph.calls():
        if call["route"] == "provision_on_demand":
            calls[call["objectId"]].append(call["client_request_id"])
    return calls


def test_n1_sigkill_during_fast_intake_loses_nothing(azurite, tmp_path):
    """The kills take turns: the host answering a post (validating, writing the received row, sending
    the envelope, or with the 202 on its way), the host that answered the last 202 (its envelope not
    yet admitted, or being admitted), a random host (admitting envelopes at the queue door, or
    calling Graph). Every event has a subject of its own, so Graph calls per subject count every
    duplicate; a client retries a failed post as it was (no Idempotency-Key)."""
    c = Cluster(azurite, tmp_path, hosts=3, FAST_INTAKE="true")
    rng = random.Random(19)
    accepted: dict[str, str] = {}                            # requestId -> subject
    failed, hosts = [0], {"serving": None, "answered": None}
    turns = ("serving", "answered", "random")
    try:
        c.warm_up()

        def client() -> None:
            for n in range(MESSAGES):
                body = [{"objectId": user(900 + i), "objectTypeName": "User", "correlationId": f"f{n}/{i}"}
                        for i in range(EVENTS_PER_MESSAGE)]
                subject = {e["correlationId"]: e["objectId"] for e in body}
                while (response := post_to_a_live_host(c, body, hosts)) is None or response.status_code != 202:
                    failed[0] += 1
                    time.sleep(0.2)
                accepted.update({r["requestId"]: subject[r["correlationId"]] for r in response.json()["requests"]})

        feeding = threading.Thread(target=client)
        feeding.start()
        kills = kill_hosts_while(c, feeding, rng, tmp_path, pick=lambda kill: hosts.get(turns[kill % len(turns)]))
        feeding.join()
        wanted = set(accepted) - enveloped_ids(c.deadletters.matching(lambda m: m.get("source") == "intake"))
        found = results_by(c, "requestId", wanted, 120 + 2 * len(wanted))
        lost = sorted(wanted - set(found))
        calls = graph_calls(c)
        subjects = [calls[s] for s in set(accepted.values())]
        again = sum(1 for ids in subjects if len(ids) > len(set(ids)))
        retried = sum(1 for ids in subjects if len(set(ids)) > 1)
        report(f"fast intake ({failed[0]} posts failed and were retried)", len(wanted), kills, lost, found,
               f"; {sum(1 for ids in subjects if len(ids) > 1)} subject(s) called more than once: {again} again "
               f"under the same requestId (at-least-once), {retried} under another (a post retried after its "
               f"envelope was queued)")
        assert lost == []
        states = c.final_states(sorted(wanted), timeout=90)
        assert set(states.values()) <= {"succeeded", "skipped"}, states
        assert c.sims.graph.max_in_window(WINDOW) <= CALLS
    finally:
        c.stop()
