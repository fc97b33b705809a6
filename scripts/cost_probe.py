"""The figures behind the cost model in docs/deploy.md: runs the benchmark (`scripts.bench`, unchanged),
samples the peak resident memory (VmHWM) of every devhost process it starts, and reads each
function execution's duration from their logs. Prints JSON: per function the executions and their
durations, the seconds Flex Consumption would bill (each execution at least 1 s, then rounded up
to 0.1 s), per instance the seconds it was busy, and the peak RSS.

    python -m scripts.cost_probe --requests 60

Linux only (/proc). Every argument after `--` goes to scripts.bench.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from scripts.bench import percentile

EXECUTED = re.compile(r"^\[(?P<ts>[^\]]+)\] Executed 'Functions\.(?P<name>\w+)' \((?P<outcome>\w+), "
                      r"Id=[^,]+, Duration=(?P<ms>\d+)ms\)", re.MULTILINE)
# Flex Consumption bills an execution period of at least 1,000 ms, then in steps of 100 ms:
# https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#billing
MIN_BILLED_S = 1.0
BILLING_STEP_S = 0.1
TIMER_FUNCTIONS = {"lease_upkeep"}
IDLE_REQUESTS = 2  # the benchmark's one-at-a-time requests; it needs at least one


@dataclass(frozen=True)
class Execution:
    name: str
    end: float
    seconds: float

    @property
    def start(self) -> float:
        return self.end - self.seconds


def billed(seconds: float) -> float:
    return max(MIN_BILLED_S, math.ceil(round(seconds / BILLING_STEP_S, 6)) * BILLING_STEP_S)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def devhost_sample(pid: int) -> tuple[int, str] | None:
    """(peak RSS in kB, the log file its stdout goes to) of a devhost process, None for others."""
    proc = Path(f"/proc/{pid}")
    try:
        if b"devhost" not in (proc / "cmdline").read_bytes():
            return None
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", (proc / "status").read_text(), re.MULTILINE)
        return (int(hwm.group(1)) if hwm else 0), str((proc / "fd" / "1").readlink())
    except OSError:
        return None


def executions(log: Path) -> list[Execution]:
    found = []
    for match in EXECUTED.finditer(log.read_text(errors="replace")):
        end = datetime.strptime(match["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
        found.append(Execution(match["name"], end, int(match["ms"]) / 1000))
    return found


def busy_periods(runs: list[Execution]) -> list[float]:
    """Lengths of the periods in which an instance ran at least one execution: Flex bills an instance's
    memory while it executes, however many executions overlap."""
    periods: list[list[float]] = []
    for run in sorted(runs, key=lambda r: r.start):
        if periods and run.start <= periods[-1][1]:
            periods[-1][1] = max(periods[-1][1], run.end)
        else:
            periods.append([run.start, run.end])
    return [end - start for start, end in periods]


def summary(runs: list[Execution]) -> dict:
    seconds = sorted(r.seconds for r in runs)
    return {
        "executions": len(runs),
        "p50_ms": round(statistics.median(seconds) * 1000),
        "p95_ms": round(percentile(seconds, 0.95) * 1000),
        "max_ms": round(seconds[-1] * 1000),
        "executed_s": round(sum(seconds), 1),
        "billed_s": round(sum(billed(s) for s in seconds), 1),
    }


def watch(bench: subprocess.Popen, interval: float) -> dict[int, tuple[int, str]]:
    """Peak RSS and log file of each devhost the benchmark runs, sampled until it exits (VmHWM only
    grows, so the last sample of a process is its peak)."""
    seen: dict[int, tuple[int, str]] = {}
    while bench.poll() is None:
        for pid in children(bench.pid):
            sample = devhost_sample(pid)
            if sample:
                seen[pid] = sample
        time.sleep(interval)
    return seen


def per_subject(per_host: dict[int, list[Execution]], subjects: int) -> dict:
    """Work done per subject served; the timer runs whatever the load, so the model counts it apart."""
    work = {pid: [r for r in runs if r.name not in TIMER_FUNCTIONS] for pid, runs in per_host.items()}
    executions_ = [run for runs in work.values() for run in runs]
    busy = [period for runs in work.values() for period in busy_periods(runs)]
    return {
        "work_executions_per_subject": round(len(executions_) / subjects, 2),
        "work_billed_s_per_subject": round(sum(billed(r.seconds) for r in executions_) / subjects, 2),
        "instance_busy_billed_s_per_subject": round(sum(billed(p) for p in busy) / subjects, 2),
    }


def report(hosts: dict[int, tuple[int, str]], bench_figures: dict) -> dict:
    per_host = {pid: executions(Path(log)) for pid, (_, log) in hosts.items()}
    runs = [run for found in per_host.values() for run in found]
    peaks = {pid: kb / 1024 for pid, (kb, _) in hosts.items()}
    return {
        "hosts": len(hosts),
        "peak_rss_mb": {str(pid): round(mb, 1) for pid, mb in peaks.items()},
        "peak_rss_mb_max": round(max(peaks.values()), 1),
        "functions": {name: summary([r for r in runs if r.name == name]) for name in sorted({r.name for r in runs})},
        "subjects_in_backlog": bench_figures["completed"],
        **per_subject(per_host, max(1, bench_figures["completed"] + bench_figures["idle_requests"])),
        "bench": {k: bench_figures[k] for k in ("requests", "completed", "lost", "elapsed_s", "graph_calls")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("bench_args", nargs="*", help="after --: more arguments for scripts.bench")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cost-probe-") as tmp:
        figures_path = Path(tmp) / "bench.json"
        bench = subprocess.Popen([sys.executable, "-m", "scripts.bench", "--requests", str(args.requests),
                                  "--idle", str(IDLE_REQUESTS), "--json", str(figures_path), *args.bench_args],
                                 stdout=subprocess.DEVNULL)
        hosts = watch(bench, args.interval)
        if bench.returncode != 0 or not figures_path.exists():
            sys.exit(f"scripts.bench failed with exit code {bench.returncode}")
        bench_figures = json.loads(figures_path.read_text())
        # The warm-up request and the idle-latency requests before the backlog are subjects served too.
        bench_figures["idle_requests"] = 1 + IDLE_REQUESTS
        print(json.dumps(report(hosts, bench_figures), indent=2))


if __name__ == "__main__":
    main()
