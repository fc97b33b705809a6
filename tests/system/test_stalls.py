"""The rate promise when a host stalls (R1 of the rate issue), with real devhost processes on one
Azurite and the Graph simulator counting arrivals:

S1  one host's Table storage answers are held back far beyond the lease hold in the middle of a
    backlog (scripts/storage_proxy.py in front of its table endpoint);
S2  one host is frozen with SIGSTOP for several holds in the middle of a backlog, then resumed.

Either way: never more than the limit in any window at the simulator, no 429, every request
answered. Windows are shrunk (tests/conftest.py FAST): 5 calls per 2 s, a 9 s hold."""
from __future__ import annotations

import math
import os
import signal
import time

import httpx

from scripts.local_stack import start_devhost
from scripts.storage_proxy import StorageProxy, table_operation
from tests.conftest import FAST
from tests.system.test_scale_out import CALLS, WINDOW, Cluster, user

HOLD = math.ceil(float(FAST["GRAPH_TIMEOUT_SECONDS"]) + WINDOW + 2 * float(FAST["RATE_LIMIT_MARGIN_SECONDS"])) + 1


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def post_to(host, body) -> list[str]:
    response = httpx.post(f"{host.url}/api/provision", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return [r["requestId"] for r in response.json()["requests"]]


def results_for(cluster: Cluster, ids: list[str]) -> int:
    wanted = set(ids)
    return len({m["requestId"] for m in cluster.results.matching(lambda m: m.get("requestId") in wanted)})


def assert_the_promise_held(cluster: Cluster, ids: list[str]) -> None:
    found = cluster.wait_all(ids, timeout=240)
    assert set(found) == set(ids), "a request was lost"
    assert all(r["result"] == "Success" for results in found.values() for r in results)
    assert cluster.sims.graph.max_in_window(WINDOW) <= CALLS
    assert cluster.sims.graph.stats()["throttled"] == 0


def test_s1_a_host_whose_table_answers_are_delayed_far_beyond_the_hold(azurite, tmp_path):
    c = Cluster(azurite, tmp_path, hosts=1)
    proxy = StorageProxy("127.0.0.1", azurite.table_port, classify=table_operation).start()
    try:
        # It polls the work queue every 100 ms, so it surely has calls under way when its table slows.
        slow_env = {**c.env, "AzureWebJobsStorage": azurite.connection_string.replace(
            f"127.0.0.1:{azurite.table_port}", f"127.0.0.1:{proxy.port}"),
            "AzureFunctionsJobHost__extensions__queues__maxPollingInterval": "100"}
        slow = start_devhost(slow_env, log_dir=tmp_path)
        c.hosts.append(slow)
        c.warm_up()
        healthy = c.hosts[0]
        ids = post_to(healthy, [{"objectId": user(i), "objectTypeName": "User"} for i in range(100)])
        wait_until(lambda: results_for(c, ids) >= 5, 60, "the backlog to start")
        before = sum(proxy.snapshot().values())
        proxy.slow_down(6 * HOLD)
        # The slow host is stuck in a table call while the other one works through the backlog.
        wait_until(lambda: sum(proxy.snapshot().values()) > before, 60, "the slow host to call its table")
        stuck_at = time.monotonic()
        wait_until(lambda: time.monotonic() - stuck_at > 3 * HOLD and results_for(c, ids) >= 30, 120,
                   "the backlog to go on without the slow host")
        proxy.speed_up()
        assert_the_promise_held(c, ids)
    finally:
        proxy.speed_up()
        c.stop()
        proxy.stop()


def test_s2_a_host_frozen_with_sigstop_for_several_holds_and_resumed(azurite, tmp_path):
    c = Cluster(azurite, tmp_path, hosts=3)
    frozen = None
    try:
        c.warm_up()
        ids = post_to(c.hosts[0], [{"objectId": user(i), "objectTypeName": "User"} for i in range(60)])
        wait_until(lambda: results_for(c, ids) >= 8, 60, "the backlog to start")
        frozen = c.hosts[1]
        os.kill(frozen.process.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        done_before = results_for(c, ids)
        wait_until(lambda: time.monotonic() - stopped_at > 4 * HOLD and results_for(c, ids) > done_before, 120,
                   "several holds to pass while the others keep working")
        os.kill(frozen.process.pid, signal.SIGCONT)
        frozen = None
        assert_the_promise_held(c, ids)
    finally:
        if frozen is not None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        c.stop()
