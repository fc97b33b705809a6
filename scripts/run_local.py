"""`make run`: the app on loopback with no Azure subscription. Ctrl-C stops everything."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import time

import httpx
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from devhost.azurite import ROOT, Azurite, start_azurite
from scripts.local_stack import Stack, start_devhost, start_simulators_process


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for_rate_lease(host_url: str, connection: str, queue: str = "provision-leases", timeout: float = 120) -> None:
    """A new token pool's tokens only become usable a window plus the epoch cache time after they
    are minted (shared/ratelimit/token_gate.py); say so instead of letting the first event wait in silence.
    The upkeep timer does not run at start-up (each run is billed), so run it now through the admin
    API, as an operator would; otherwise the first worker call would mint the pool."""
    httpx.post(f"{host_url}/admin/functions/lease_upkeep", json={}, timeout=10).raise_for_status()
    leases = QueueClient.from_connection_string(connection, queue)
    started = time.monotonic()
    told = False
    while time.monotonic() - started < timeout:
        try:
            if list(leases.peek_messages(max_messages=1)):
                return
        except ResourceNotFoundError:
            pass
        if not told:
            print("Waiting for the rate lease's first tokens (about 13 s on a first start)...", flush=True)
            told = True
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=7071, help="devhost HTTP port (default 7071)")
    parser.add_argument("--latency", default="0.2-1.0", help="simulated Graph latency range in seconds")
    parser.add_argument("--sink", choices=["queue", "loganalytics", "both"], default=os.environ.get("RESULTS_SINK", "queue"),
                        help="where results go (RESULTS_SINK); loganalytics/both start the Logs Ingestion simulator")
    args = parser.parse_args()
    # Explicit handlers: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    data = ROOT / ".run" / "azurite"
    data.mkdir(parents=True, exist_ok=True)
    # The well-known ports let Storage Explorer and UseDevelopmentStorage=true find it.
    if all(_port_free(p) for p in (10000, 10001, 10002)):
        azurite = Azurite(10001, 10002, 10000, location=str(data), persistent=True).start()
    else:
        azurite = start_azurite(persistent=True, location=str(data))
    sims, sim_env = start_simulators_process(["--latency", args.latency])
    stack = Stack(azurite, sims, sim_env)
    logs_sim, logs_env = None, {"RESULTS_SINK": args.sink}
    if args.sink != "queue":
        # In-process: the identity simulator is in another process, so this one checks token
        # audience and lifetime but not the signature (see simulators/logs_ingestion.py).
        from simulators.logs_ingestion import start_logs_ingestion

        logs_sim = start_logs_ingestion()
        logs_env.update(logs_sim.env())
    try:
        stack.hosts.append(start_devhost(stack.app_env(**{**{k: v for k, v in os.environ.items()
                                                             if k.startswith(("RATE_", "GRAPH_API", "RESULTS_"))},
                                                          **logs_env}),
                                         port=args.port))
        wait_for_rate_lease(stack.hosts[0].url, azurite.connection_string)
        if logs_sim is not None:
            print(f"  Logs Ingestion sim    {logs_sim.endpoint}  (RESULTS_SINK={args.sink}; rows it accepted: "
                  f"curl -s --cacert {logs_sim.cert_file} {logs_sim.endpoint}/_sim/rows)", flush=True)
        print(f"""
Everything runs on loopback:
  Azurite (queues)      {azurite.queue_endpoint}  (tables on port {azurite.table_port})
  Graph simulator       {sim_env['GRAPH_ENDPOINT']}
  Managed identity      {sim_env['IDENTITY_ENDPOINT']}
  Function app          http://127.0.0.1:{args.port}/api/provision   (log: {stack.hosts[0].log_path})

Send a first event (the API page's example user):

  curl -s -X POST http://127.0.0.1:{args.port}/api/provision -H 'Content-Type: application/json' \\
       -d '{{"objectId": "9bb0f679-a883-4a6f-8260-35b491b8b8c8", "objectTypeName": "User"}}'

Then ask where it stands (the requestId is in the answer), or read the decoded result from the
provision-results queue:

  curl -s http://127.0.0.1:{args.port}/api/provision/<requestId>
  .venv/bin/python -m scripts.results --connection '{azurite.connection_string}'

Ctrl-C stops everything.""", flush=True)
        while all(h.process.poll() is None for h in stack.hosts):
            time.sleep(0.5)
        print("devhost stopped; see its log")
    except KeyboardInterrupt:
        print("\nstopping...")
    finally:
        stack.stop()
        if logs_sim is not None:
            logs_sim.stop()


if __name__ == "__main__":
    main()
