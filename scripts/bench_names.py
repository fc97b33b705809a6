"""What naming subjects costs at intake: `python -m scripts.bench_names [--requests 300] [--names 10]`.

Intake (validation and planning, `shared.intake.validation.accept`) runs with the real GraphClient,
the real azure-identity credential against the identity simulator, and the Graph simulator's
directory, in three ways over the same subjects: by objectId (the baseline, no lookup), by
userPrincipalName with NAME_CACHE_SECONDS=600, and by userPrincipalName with the cache off (0).
Prints milliseconds per request, each as a ratio to the baseline, and the directory reads made;
provisionOnDemand calls must stay 0 (lookups never spend that budget)."""
from __future__ import annotations

import argparse
import json
import os
import time

from shared.graph.client import GraphClient
from shared.graph.credentials import app_credential
from shared.intake.names import NameResolver
from shared.intake.rule_discovery import RuleCache
from shared.intake.validation import accept
from shared.settings import Settings
from simulators import start_simulators
from simulators.directory import directory_of

SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"


def run(bodies: list[str], settings: Settings, names: NameResolver | None) -> float:
    started = time.perf_counter()
    for body in bodies:
        accept(body, settings, names=names)
    return (time.perf_counter() - started) * 1000 / len(bodies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--names", type=int, default=10, help="distinct users the requests name")
    args = parser.parse_args(argv)
    sims = start_simulators(roles=["Synchronization.ReadWrite.All", "User.Read.All"])
    try:
        os.environ.update({k: v for k, v in sims.env().items() if k.startswith("IDENTITY_")})
        directory = directory_of(sims.graph)
        users = directory.add(users=[{"userPrincipalName": f"user{i}@contoso.com"} for i in range(args.names)])["users"]
        settings = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", GRAPH_ENDPOINT=sims.graph_endpoint,
                            DEFAULT_SERVICE_PRINCIPAL_ID=SP, DEFAULT_JOB_ID="job", DEFAULT_RULE_ID="rule")
        graph = GraphClient(settings, app_credential(None))
        graph.token()  # the credential's first token is not what is measured
        picks = [users[i % len(users)] for i in range(args.requests)]
        by_id = [json.dumps({"objectTypeName": "User", "objectId": u["id"]}) for u in picks]
        by_name = [json.dumps({"objectTypeName": "User", "userPrincipalName": u["userPrincipalName"]}) for u in picks]
        figures = {"objectId (baseline)": (run(by_id, settings, None), 0)}
        for label, ttl in (("userPrincipalName, cache 600 s", 600), ("userPrincipalName, cache off", 0)):
            before = len(directory.calls)
            ms = run(by_name, settings, NameResolver(graph, RuleCache(ttl), settings))
            figures[label] = (ms, len(directory.calls) - before)
        baseline = figures["objectId (baseline)"][0]
        print(f"{args.requests} requests naming {args.names} users")
        for label, (ms, reads) in figures.items():
            print(f"{label:34s} {ms:8.3f} ms/request  x{ms / baseline:7.1f}  directory reads {reads}")
        print(f"provisionOnDemand calls: {len([c for c in sims.graph.calls() if c['route'] == 'provision_on_demand'])}")
    finally:
        sims.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
