"""`make bench` (intake part): how fast POST /api/provision accepts work, against a trivial HTTP
function of the same devhost in the same run (issue 13, "fast intake").

Real Azurite, the Graph and identity simulators, devhost with the app's defaults and the worker's
thread pool as deployed. Two layouts, each on a fresh Azurite: `one`, one devhost serving every
function (the HTTP door and the queue door share its process and cores); `groups`, one devhost
for the HTTP functions and one for the queue and timer functions (AzureWebJobs.<name>.Disabled),
as Flex Consumption's per-function scaling places them. In each, one phase after the other:
  1. trivial: C concurrent clients call GET /api/health (anonymous, no storage) for S seconds;
  2. intake:  C concurrent clients POST one compact event each (a new user every time) for S seconds;
  3. bulk:    one POST of 1000 compact events;
  4. steps (layout `one` only): 50 single posts and one bulk post in process against the same
              Azurite, timing each intake step.
Prints requests per second and latency percentiles for 1 and 2, their ratio, how many POSTs
shared a post (group commit), the bulk answer time and where one post's time goes.

    python -m scripts.bench_intake --clients 8 --seconds 15 [--layout one|groups|both] [--[no-]fast-intake]
"""
from __future__ import annotations

import argparse
import json
import os
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


def accepted_post(response: httpx.Response, posts: list[str]) -> int:
    from shared.intake import envelope

    if response.status_code == 202:
        found = envelope.post_of(response.json()["requests"][0]["requestId"])
        if found:  # not when the HTTP door admitted the post itself (FAST_INTAKE=false)
            posts.append(found[0])
    return response.status_code


def event() -> dict:
    return {"objectId": str(uuid.uuid4()), "objectTypeName": "User", "correlationId": "bench-intake"}


SAMPLE_THREADS = json.loads((Path(__file__).parent.parent / "local.settings.sample.json").read_text())[
    "Values"]["PYTHON_THREADPOOL_THREAD_COUNT"]


def functions_by_group() -> tuple[list[str], list[str]]:
    """The app's HTTP functions, and the others: Flex Consumption scales HTTP triggers together and
    every other trigger on its own instances (per-function scaling,
    https://learn.microsoft.com/en-us/azure/azure-functions/flex-consumption-plan#per-function-scaling)."""
    import function_app

    http, others = [], []
    for function in function_app.app.get_functions():
        types = [b["type"] for b in json.loads(function.get_function_json())["bindings"]]
        (http if "httpTrigger" in types else others).append(function.get_function_name())
    return http, others


def disabled(names: list[str]) -> dict[str, str]:
    return {f"AzureWebJobs.{name}.Disabled": "true" for name in names}


def measure(layout: str, args: argparse.Namespace, groups: tuple[list[str], list[str]]) -> dict:
    """One layout on a fresh Azurite: `one` serves every function from one devhost; `groups` serves
    the HTTP functions from one devhost and the queue and timer functions from another, as Flex
    Consumption places them. The trivial and intake phases both hit the HTTP devhost."""
    azurite = start_azurite()
    sims = start_simulators(rate_calls=5, rate_window=10.0)
    env = {"AzureWebJobsStorage": azurite.connection_string, **sims.env(), "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP,
           "DEFAULT_JOB_ID": EXAMPLE_JOB, "DEFAULT_RULE_ID": EXAMPLE_RULE,
           # The worker's thread pool as deployed (infra/main.bicep), unless the caller's environment says otherwise.
           "PYTHON_THREADPOOL_THREAD_COUNT": os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT") or SAMPLE_THREADS}
    if args.fast_intake is not None:
        env["FAST_INTAKE"] = str(args.fast_intake).lower()
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-intake-{layout}-"))
    http_functions, other_functions = groups
    hosts = ([start_devhost(env, log_dir=log_dir)] if layout == "one" else
             [start_devhost({**env, **disabled(other_functions)}, log_dir=log_dir),
              start_devhost({**env, **disabled(http_functions)}, log_dir=log_dir)])
    try:
        provision, health = f"{hosts[0].url}/api/provision", f"{hosts[0].url}/api/health"
        with httpx.Client(timeout=60) as http:  # warm-up: tables, queues and pools exist afterwards
            http.post(provision, json=event()).raise_for_status()
            http.get(health).raise_for_status()
        trivial = hammer(args.clients, args.seconds, lambda http: http.get(health).status_code)
        posts: list[str] = []  # each accepted request's post: how many POSTs shared one (group commit)
        intake = hammer(args.clients, args.seconds, lambda http: accepted_post(http.post(provision, json=event()), posts))
        with httpx.Client(timeout=120) as http:
            began = time.monotonic()
            bulk = http.post(provision, json=[event() for _ in range(args.bulk)])
            bulk_seconds = time.monotonic() - began
        steps = breakdown(env, posts=50, bulk=args.bulk) if layout == "one" else None
    finally:
        for host in hosts:
            host.stop()
        sims.stop()
        azurite.stop()
    return {"layout": layout, "trivial": trivial, "intake": intake,
            "posts_per_write": round(len(posts) / len(set(posts)), 2) if posts else None,
            "ratio": round(intake["per_second"] / trivial["per_second"], 3) if trivial["per_second"] else None,
            "bulk": {"events": args.bulk, "status": bulk.status_code, "seconds": round(bulk_seconds, 2)},
            "steps_p50_ms": steps}


LAYOUTS = {"one": "one devhost serving every function",
           "groups": "one devhost for the HTTP functions, another for the queue and timer functions"}


def report(figures: dict, args: argparse.Namespace) -> None:
    trivial, intake, bulk = figures["trivial"], figures["intake"], figures["bulk"]
    print(f"\nLayout '{figures['layout']}' ({LAYOUTS[figures['layout']]}), {args.clients} concurrent clients, "
          f"{args.seconds:g} s each:")
    print(f"  trivial GET /api/health:     {trivial['per_second']:7.1f} req/s   p50 {trivial['p50_ms']} ms   "
          f"p95 {trivial['p95_ms']} ms   answers {trivial['statuses']}")
    print(f"  single-event POST (202):     {intake['per_second']:7.1f} req/s   p50 {intake['p50_ms']} ms   "
          f"p95 {intake['p95_ms']} ms   answers {intake['statuses']}")
    print(f"  POSTs per shared post:       {figures['posts_per_write']}   (group commit: one received row and "
          f"one envelope per shared post)")
    print(f"  ratio accepted / trivial:    {figures['ratio']}   (target >= 0.5, p95 <= 100 ms)")
    print(f"  {bulk['events']}-event bulk POST:       {bulk['status']} in {bulk['seconds']:.2f} s   (target <= 2 s)")
    steps = figures["steps_p50_ms"] or {}
    for kind, label in (("single", "one single-event POST in process, median"),
                        ("bulk", f"one {bulk['events']}-event POST in process")):
        if kind in steps:
            print(f"  {label}, ms per step: " + ", ".join(f"{k} {v}" for k, v in steps[kind].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--bulk", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--fast-intake", action=argparse.BooleanOptionalAction, default=None,
                        help="set FAST_INTAKE (default: the app's default)")
    parser.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    args = parser.parse_args()

    groups = functions_by_group()
    runs = [measure(layout, args, groups) for layout in (LAYOUTS if args.layout == "both" else [args.layout])]
    print(f"\nIntake ({platform.machine()}, Python {platform.python_version()}, FAST_INTAKE "
          f"{'default' if args.fast_intake is None else args.fast_intake}):")
    for figures in runs:
        report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
