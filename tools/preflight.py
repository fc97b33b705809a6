"""Preflight from a workstation: `python -m tools.preflight --settings local.settings.json`.

The checks themselves live in the app (shared/operations/preflight.py) and also answer
`GET /api/health/deep`; this is only their command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.graph.client import GraphClient
from shared.operations.preflight import run_preflight


def _load_settings_file(path: Path) -> None:
    """local.settings.json's Values, for names not already in the environment."""
    values = json.loads(path.read_text()).get("Values") or {}
    for key, value in values.items():
        if key not in os.environ and value not in (None, ""):
            os.environ[key] = str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.preflight", description="Can this deployment provision right now, and if not, what must be fixed?")
    parser.add_argument("--settings", type=Path, help="read app settings from a local.settings.json-style file "
                                                      "(environment variables win)")
    parser.add_argument("--service-principal-id", help="check this service principal instead of the default")
    parser.add_argument("--job-id", help="check this job instead of the default")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    args = parser.parse_args(argv)

    from shared.errors import SettingsError
    from shared.graph.credentials import app_credential
    from shared.queues import service_client
    from shared.settings import load_settings

    if args.settings:
        _load_settings_file(args.settings)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"Preflight cannot start: {exc}", file=sys.stderr)
        return 2
    graph = GraphClient(settings, app_credential(settings.azure_client_id))
    try:
        report = run_preflight(settings, graph, service_client(settings),
                               service_principal_id=args.service_principal_id, job_id=args.job_id)
    finally:
        graph.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 1 if report.status == "fail" or (args.strict and report.status == "warn") else 0


if __name__ == "__main__":
    sys.exit(main())
