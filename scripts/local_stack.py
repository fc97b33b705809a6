"""Start the whole app on loopback: Azurite, the Graph and managed identity simulators, and one or
more devhost processes. Shared by `make run`, the end-to-end tests and the benchmark."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devhost.azurite import Azurite, free_port

ROOT = Path(__file__).resolve().parent.parent

# The API page's first example: what `make run` provisions into by default.
EXAMPLE_SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
EXAMPLE_JOB = "3f7565a3-fde6-4e4d-bda8-1bb70aba3612"
EXAMPLE_RULE = "ea807875-5618-4f0a-9125-0b46a05298ca"


def start_simulators_process(extra_args: list[str] | None = None) -> tuple[subprocess.Popen, dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "simulators", *(extra_args or [])], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    env: dict[str, str] = {}
    deadline = time.monotonic() + 30
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.strip()
        if line == "Simulators ready":
            return proc, env
        if "=" in line and line.split("=", 1)[0].isupper():
            key, value = line.split("=", 1)
            env[key] = value
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the simulators did not start")


@dataclass
class DevHost:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        stop_process(self.process, sig, timeout)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> bool:
    """Signal `process` and wait for it; killed if it outlives `timeout`. False when it had to be killed."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return False
    return True


def start_devhost(env: dict[str, str], port: int | None = None, log_dir: Path | None = None,
                  timeout: float = 60) -> DevHost:
    port = port or free_port()
    log_dir = log_dir or ROOT / ".run"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"devhost-{port}.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "devhost", "--port", str(port), "--app-dir", str(ROOT)],
                                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    host = DevHost(port, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"devhost exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{host.url}/admin/host/status", timeout=1).status_code == 200:
                return host
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    host.stop()
    raise RuntimeError(f"devhost did not become ready:\n{log_path.read_text()[-3000:]}")


@dataclass
class Stack:
    azurite: Azurite
    simulators: subprocess.Popen
    sim_env: dict[str, str]
    hosts: list[DevHost] = field(default_factory=list)

    def app_env(self, **overrides: str) -> dict[str, str]:
        env = {
            "AzureWebJobsStorage": self.azurite.connection_string,
            **self.sim_env,
            "DEFAULT_SERVICE_PRINCIPAL_ID": EXAMPLE_SP,
            "DEFAULT_JOB_ID": EXAMPLE_JOB,
            "DEFAULT_RULE_ID": EXAMPLE_RULE,
        }
        env.update(overrides)
        return env

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        if self.simulators.poll() is None:
            self.simulators.terminate()
            self.simulators.wait(10)
        self.azurite.stop()
