"""Cold start: how long importing function_app takes (what the host does to index the functions)
against importing azure.functions alone, in fresh interpreters, in one run.

    .venv/bin/python -m scripts.cold_start [--runs 9] [--limit 2.0]

Prints both medians and their ratio; exits 1 when the ratio is above --limit. For the record it
also prints what the first invocation then adds (importing the handlers and their clients), which
the host pays on the first event instead of before it can index the functions. Each import runs in
a new process with settings that make the app valid, alternating the two so that disk cache and
machine load affect both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the first HTTP or queue invocation imports beyond function_app.
FIRST_CALL = "function_app, shared.handlers, shared.operations.readiness, shared.results.log_analytics"
PROBE = ("import time; t = time.perf_counter(); import {module}; "
         "print(time.perf_counter() - t)")


def import_seconds(module: str) -> float:
    env = {**os.environ, "AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--limit", type=float, default=2.0)
    args = parser.parse_args(argv)
    base, app, first = [], [], []
    import_seconds(FIRST_CALL)  # one unmeasured run compiles the .pyc files
    for _ in range(args.runs):
        base.append(import_seconds("azure.functions"))
        app.append(import_seconds("function_app"))
        first.append(import_seconds(FIRST_CALL))
    base_median, app_median = statistics.median(base), statistics.median(app)
    ratio = app_median / base_median
    print(f"import azure.functions  median {base_median * 1000:7.1f} ms  ({args.runs} runs)")
    print(f"import function_app     median {app_median * 1000:7.1f} ms  ({args.runs} runs)")
    print(f"ratio {ratio:.2f} (limit {args.limit:g})")
    print(f"then the first invocation imports shared/: median {(statistics.median(first) - app_median) * 1000:.1f} ms more")
    return 0 if ratio <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
