"""`make bench` (intake part): how fast POST /api/provision accepts work, against a trivial HTTP
function of the same devhost in the same run (issue 13, "fast intake").

Real Azurite, the Graph and identity simulators, one devhost with the app's defaults. Three phases,
each after the previous one:
  1. trivial: C concurrent clients call GET /api/health (anonymous, no storage) for S seconds;
  2. intake:  C concurrent clients POST one compact event each (a new user every time) for S seconds;
  3. bulk:    one POST of 1000 compact events;
  4. steps:   50 single posts and one bulk post in process against the same Azurite, timing each
              intake step (accept = validate, check = peeked backlog, mark_received = the post's received
              row, send_all = the envelopes; admit, place and record_requests only where the HTTP door
              still admits a post itself).
Prints requests per second and latency percentiles for 1 and 2, their ratio, the bulk answer time
and where one post's time goes.

    python -m scripts.bench_intake --clients 8 --seconds 15 [--fast-intake]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from devhost.azurite import start_azurite
from scripts.bench import percentile
from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP, start_devhost
from simulators import start_simulators


def hammer(clients: int, seconds: float, send) -> dict:
    """`send(http)` from `clients` threads for `seconds`; returns counts and latencies of 2xx answers."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            start.wait()
            while time.monotonic() < stop_at[0]:
                began = time.monotonic()
                status = send(http)
                took = time.monotonic() - began
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if 200 <= status < 300:
                        latencies.append(took)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop_at.append(time.monotonic() + seconds)
    began = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {"ok": len(latencies), "statuses": statuses, "elapsed": round(elapsed, 2),
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 1) if latencies else None,
            "p95_ms": round(percentile(latencies, 0.95) * 1000, 1) if latencies else None}


def timed(owner, name: str, spent: dict[str, list[float]]) -> None:
    """Wrap owner.name so that each call's duration is added to spent[name]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.setdefault(name, []).append(time.monotonic() - began)
    setattr(owner, name, wrapper)


def breakdown(env: dict[str, str], posts: int, bulk: int) -> dict[str, dict[str, float]]:
    """Where a POST spends its time, in process against the same Azurite: the median of each intake
    step over `posts` sequential single-event posts (no concurrency, so no contention), and each
    step of one `bulk`-event post."""
    from shared import handlers
    from shared.intake import backlog, envelope
    from shared.runtime import build_runtime
    from shared.settings import Settings

    rt = build_runtime(Settings(**env))
    spent: dict[str, list[float]] = {}
    timed(rt.status, "admit", spent)
    timed(rt.status, "record_requests", spent)
    timed(handlers, "place", spent)
    timed(handlers, "accept", spent)
    # Fast intake's steps: the peeked backlog, the post's received row, the envelopes' sends.
    timed(backlog, "check", spent)
    timed(rt.status, "mark_received", spent)
    timed(envelope, "send_all", spent)
    bodies = [json.dumps(event()).encode() for _ in range(posts)] + [json.dumps([event() for _ in range(bulk)]).encode()]
    for body in bodies:
        began = time.monotonic()
        handlers.provision_http(body, {"Content-Type": "application/json"}, rt)
        spent.setdefault("whole POST", []).append(time.monotonic() - began)
    single = {step: round(percentile(times[:-1], 0.5) * 1000, 1) for step, times in spent.items()}
    whole_bulk = {step: round(times[-1] * 1000, 1) for step, times in spent.items()}
    return {"single": single, "bulk": whole_bulk}


def event() -> dict:
    return {"objectId": str(uuid.uuid4()), "objectTypeName": "User", "correlationId": "bench-intake"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--bulk", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--fast-intake", action="store_true", help="run the devhost with FAST_INTAKE=true")
    args = parser.parse_args()

    azurite = start_azurite()
    sims = start_simulators(rate_calls=5, rate_window=10.0)
    env = {"AzureWebJobsStorage": azurite.connection_string, **sims.env(), "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP,
           "DEFAULT_JOB_ID": EXAMPLE_JOB, "DEFAULT_RULE_ID": EXAMPLE_RULE,
           "FAST_INTAKE": "true" if args.fast_intake else "false"}
    host = start_devhost(env, log_dir=Path(tempfile.mkdtemp(prefix="bench-intake-")))
    try:
        provision, health = f"{host.url}/api/provision", f"{host.url}/api/health"
        with httpx.Client(timeout=60) as http:  # warm-up: tables, queues and pools exist afterwards
            http.post(provision, json=event()).raise_for_status()
            http.get(health).raise_for_status()
        trivial = hammer(args.clients, args.seconds, lambda http: http.get(health).status_code)
        intake = hammer(args.clients, args.seconds, lambda http: http.post(provision, json=event()).status_code)
        with httpx.Client(timeout=120) as http:
            began = time.monotonic()
            bulk = http.post(provision, json=[event() for _ in range(args.bulk)])
            bulk_seconds = time.monotonic() - began
        steps = breakdown(env, posts=50, bulk=args.bulk)
    finally:
        host.stop()
        sims.stop()
        azurite.stop()

    figures = {"machine": f"{platform.machine()}, {platform.python_version()}", "clients": args.clients,
               "trivial": trivial, "intake": intake,
               "ratio": round(intake["per_second"] / trivial["per_second"], 3) if trivial["per_second"] else None,
               "bulk": {"events": args.bulk, "status": bulk.status_code, "seconds": round(bulk_seconds, 2)},
               "steps_p50_ms": steps}
    print(f"\nIntake at {args.clients} concurrent clients, {args.seconds:g} s each (one devhost, same run, "
          f"FAST_INTAKE={env['FAST_INTAKE']}):")
    print(f"  trivial GET /api/health:     {trivial['per_second']:7.1f} req/s   p50 {trivial['p50_ms']} ms   "
          f"p95 {trivial['p95_ms']} ms   answers {trivial['statuses']}")
    print(f"  single-event POST (202):     {intake['per_second']:7.1f} req/s   p50 {intake['p50_ms']} ms   "
          f"p95 {intake['p95_ms']} ms   answers {intake['statuses']}")
    print(f"  ratio accepted / trivial:    {figures['ratio']}   (target >= 0.5, p95 <= 100 ms)")
    print(f"  {args.bulk}-event bulk POST:       {bulk.status_code} in {bulk_seconds:.2f} s   (target <= 2 s)")
    for kind, label in (("single", "one single-event POST in process, median"), ("bulk", f"one {args.bulk}-event POST in process")):
        print(f"  {label}, ms per step: " + ", ".join(f"{k} {v}" for k, v in steps[kind].items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
