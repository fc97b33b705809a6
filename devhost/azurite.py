"""Start and stop Azurite (the real Azure Storage emulator from npm) on free loopback ports.

Used by `make run` and by the test fixtures, so both talk to the same kind of storage the
Functions host uses in Azure.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# The documented, public development-storage key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def azurite_binary() -> str:
    local = ROOT / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    found = shutil.which("azurite")
    if not found:
        raise RuntimeError("Azurite is not installed: run `npm ci` in the project root (make does it)")
    return found


@dataclass
class Azurite:
    """A running Azurite process; `connection_string` points the SDKs at it."""

    queue_port: int
    table_port: int
    blob_port: int
    process: subprocess.Popen | None = None
    location: str | None = None
    persistent: bool = False
    _log: object = field(default=None, repr=False)

    @property
    def queue_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.queue_port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={self.queue_endpoint};"
            f"TableEndpoint=http://127.0.0.1:{self.table_port}/{ACCOUNT};"
        )

    def start(self, timeout: float = 30.0) -> "Azurite":
        if self.location is None:
            self.location = tempfile.mkdtemp(prefix="azurite-")
        args = [
            azurite_binary(),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.table_port),
            # azure-storage-queue 12.18 sends an API version Azurite 3.37 does not know yet.
            "--skipApiVersionCheck", "--disableTelemetry", "--silent",
        ]
        # Azurite refuses --location together with --inMemoryPersistence.
        args += ["--location", self.location] if self.persistent else ["--inMemoryPersistence"]
        os.makedirs(self.location, exist_ok=True)
        self._log = open(os.path.join(self.location, "azurite.log"), "ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Azurite exited with {self.process.returncode}; see {self.location}/azurite.log")
            try:
                with socket.create_connection(("127.0.0.1", self.queue_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Azurite did not start listening in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log:
            self._log.close()
            self._log = None


def start_azurite(persistent: bool = False, location: str | None = None) -> Azurite:
    return Azurite(free_port(), free_port(), free_port(), location=location, persistent=persistent).start()
