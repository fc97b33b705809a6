"""Run the simulators as a process:

    python -m simulators [--graph-port N] [--identity-port N] [--latency 0.2-2.5] [--rate 5/10]
                         [--roles Synchronization.ReadWrite.All ...] [--no-count-throttled] ...

Prints `GRAPH_ENDPOINT=...`, `IDENTITY_ENDPOINT=...`, `IDENTITY_HEADER=...`, then
`Simulators ready`, and serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import sys

from . import start_simulators
from .graph import parse_latency
from .httpbase import serve_until_signalled
from .ratelimit import parse_rate
from .tokens import DEFAULT_ROLES, SIM_CLIENT_ID, SIM_OBJECT_ID, SIM_TENANT_ID


def _roles(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [r for v in values for r in v.replace(",", " ").split() if r]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulators", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--graph-port", type=int, default=0, help="0 = any free port (default)")
    p.add_argument("--identity-port", type=int, default=0, help="0 = any free port (default)")
    p.add_argument("--identity-header", default=None, help="the X-IDENTITY-HEADER secret (default: random)")
    p.add_argument("--latency", default=None, help="Graph answer delay: seconds or LO-HI, e.g. 0.2-2.5")
    p.add_argument("--rate", default="5/10", help="CALLS/SECONDS sliding window per tenant (default 5/10); "
                                                  "0/10 disables throttling")
    p.add_argument("--no-count-throttled", action="store_true",
                   help="throttled arrivals do not count toward the window")
    p.add_argument("--roles", nargs="*", default=None,
                   help=f"roles in issued tokens (default {' '.join(DEFAULT_ROLES)}); no value = none")
    p.add_argument("--tenant-id", default=SIM_TENANT_ID)
    p.add_argument("--client-id", default=SIM_CLIENT_ID)
    p.add_argument("--object-id", default=SIM_OBJECT_ID)
    p.add_argument("--token-lifetime", type=float, default=3600)
    p.add_argument("--clock-skew", type=float, default=0.0, help="leeway for token exp/nbf checks (seconds)")
    p.add_argument("--seed", type=int, default=None, help="seed for the latency random generator")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        latency = parse_latency(args.latency)
        rate_calls, rate_window = parse_rate(args.rate)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sims = start_simulators(
        args.graph_port, args.identity_port, host=args.host, identity_header=args.identity_header,
        roles=_roles(args.roles), tenant_id=args.tenant_id, client_id=args.client_id, object_id=args.object_id,
        token_lifetime=args.token_lifetime, latency=latency, rate_calls=rate_calls, rate_window=rate_window,
        count_throttled=not args.no_count_throttled, clock_skew=args.clock_skew, seed=args.seed,
        verbose=args.verbose,
    )
    return serve_until_signalled(sims, "Simulators ready")

if __name__ == "__main__":
    sys.exit(main())
