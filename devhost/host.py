"""The devhost: wires settings, the user's app, HTTP, queue and timer triggers into one process.

Order matters and follows `func start`: settings go into os.environ before the app is imported
(apps read configuration at import time), bindings are resolved after, and the host reports
`Host started` only when every listener is running.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from azure.functions.queue import QueueMessage as FunctionQueueMessage
from azure.functions.timer import TimerRequest

from devhost.functions import HTTP_TRIGGER, QUEUE_TRIGGER, TIMER_TRIGGER, FunctionSpec, describe_functions, import_app
from devhost.host_config import HostConfig, load_host_config
from devhost.http_server import HttpFrontend, function_route
from devhost.invocation import Invoker
from devhost.queue_listener import DEFAULT_MESSAGE_LEASE, QueueListener
from devhost.settings import apply_settings, find_settings_file, read_settings_file
from devhost.singleton import QueueLock, lock_queue_name
from devhost.storage import QueueClients, QueueWatcher, StorageConfigError, resolve_connection_string
from devhost.timer import TimerTrigger

log = logging.getLogger("devhost")

DEFAULT_PORT = 7071
FUNCTION_KEY_SETTING = "DEVHOST_FUNCTION_KEY"
# "true": pass clients' X-MS-CLIENT-PRINCIPAL* headers through, as if App Service Authentication set them.
EASY_AUTH_SETTING = "DEVHOST_EMULATE_EASY_AUTH"
HOST_ID_SETTING = "AzureFunctionsWebHost__hostid"


def message_lease() -> float:
    """How long a received message stays hidden while it runs (renewed at half-time). 10 minutes
    as in the queue extension; crash tests shorten it with DEVHOST_MESSAGE_LEASE_SECONDS so that a
    killed process's messages come back in seconds rather than minutes."""
    return float(os.environ.get("DEVHOST_MESSAGE_LEASE_SECONDS") or DEFAULT_MESSAGE_LEASE)


@dataclass
class HostOptions:
    app_dir: Path
    port: int | None = None  # None: local.settings `Host.LocalHttpPort`, else 7071
    settings_file: Path | None = None
    bind: str = "127.0.0.1"
    shutdown_timeout: float = 30.0


class Host:
    def __init__(self, options: HostOptions) -> None:
        self.options = options
        self.app_dir = options.app_dir.resolve()
        self.config: HostConfig | None = None
        self.functions: list[FunctionSpec] = []
        self._clients = QueueClients(os.environ)
        self._watcher = QueueWatcher()
        self._invoker: Invoker | None = None
        self._http: HttpFrontend | None = None
        self._listeners: list[QueueListener] = []
        self._timers: list[TimerTrigger] = []

    @property
    def port(self) -> int:
        assert self._http is not None, "host not started"
        return self._http.port

    # -- startup ---------------------------------------------------------------------------
    def _load_settings(self) -> int:
        """Merge local settings into os.environ; returns the HTTP port to use."""
        port = self.options.port
        path = find_settings_file(self.app_dir, self.options.settings_file)
        if path is not None:
            document = read_settings_file(path)
            applied = apply_settings(document.get("Values", {}))
            log.info("Settings: %d value(s) from %s (environment variables take precedence)", len(applied), path)
            if port is None:
                local_port = (document.get("Host") or {}).get("LocalHttpPort")
                port = int(local_port) if local_port else None
        # The worker sets this for apps that locate files relative to the script root.
        os.environ.setdefault("AzureWebJobsScriptRoot", str(self.app_dir))
        return DEFAULT_PORT if port is None else port

    def _host_id(self) -> str:
        # Processes of one app share a host id (so they share timer locks), like instances in Azure.
        return os.environ.get(HOST_ID_SETTING) or "devhost-" + hashlib.sha1(str(self.app_dir).encode()).hexdigest()[:16]

    def _timer_lock(self, spec: FunctionSpec, timer: list[TimerTrigger]) -> QueueLock | None:
        try:
            resolve_connection_string(None, os.environ)
        except StorageConfigError:
            log.warning("Timer '%s': AzureWebJobsStorage is not set, so it runs in every devhost process", spec.name)
            return None
        client = self._clients.queue(None, lock_queue_name(self._host_id(), f"{spec.name}.Listener"))
        # The trigger does not exist yet when the lock is made; the callback reaches it later.
        return QueueLock(self._clients, client, on_lost=lambda: timer[0].lock_lost())

    def start(self) -> None:
        began = time.monotonic()
        port = self._load_settings()
        self.config = config = load_host_config(self.app_dir)
        app = import_app(self.app_dir)
        self.functions, skipped = describe_functions(app, os.environ, str(self.app_dir))
        for warning in skipped:
            log.warning(warning)

        self._invoker = invoker = Invoker(
            self._clients, self._watcher, message_encoding=config.queues.message_encoding,
            function_timeout=config.function_timeout, max_workers=Invoker.worker_count_from_env())
        for spec in self.functions:
            if spec.trigger.type == QUEUE_TRIGGER:
                self._listeners.append(QueueListener(spec, self._clients, self._watcher, invoker, config.queues,
                                                     message_lease=message_lease()))
            elif spec.trigger.type == TIMER_TRIGGER:
                holder: list[TimerTrigger] = []
                holder.append(TimerTrigger(spec, invoker, self._timer_lock(spec, holder)))
                self._timers.append(holder[0])
        # Resolve every queue output's connection now, so a missing setting fails the start.
        for spec in self.functions:
            for binding in spec.queue_outputs:
                self._clients.queue(binding.get("connection"), str(binding.get("queueName")))

        self._http = HttpFrontend(self.options.bind, port, config.route_prefix, self.functions, invoker,
                                  function_key=os.environ.get(FUNCTION_KEY_SETTING) or None,
                                  admin_invoke=self._admin_invoke,
                                  emulate_easy_auth=os.environ.get(EASY_AUTH_SETTING, "").lower() == "true")
        self._print_functions()
        for listener in self._listeners:
            listener.start()
        for timer in self._timers:
            timer.start()
        log.info("Host started (%dms), process %d", (time.monotonic() - began) * 1000, os.getpid())
        print("Host started", flush=True)
        # Serving last: the socket already listens (early clients wait in its backlog), and a
        # launcher that sees /admin/host/status answer also finds "Host started" in the output.
        self._http.start()

    def _print_functions(self) -> None:
        assert self._http is not None and self.config is not None
        lines = ["", "Functions:", ""]
        for spec in self.functions:
            if spec.trigger.type == HTTP_TRIGGER:
                methods = spec.trigger.get("methods")
                shown = f"[{','.join(str(m).upper() for m in methods)}] " if methods else ""
                url = f"http://{self.options.bind}:{self._http.port}/{function_route(spec, self.config.route_prefix)}"
                lines.append(f"\t{spec.name}: {shown}{url}")
            else:
                lines.append(f"\t{spec.name}: {spec.trigger.type}")
            lines.append("")
        print("\n".join(lines), flush=True)

    def _admin_invoke(self, name: str, text: str) -> bool:
        """POST /admin/functions/{name}: run a queue or timer function without its trigger source."""
        spec = next((s for s in self.functions if s.name.lower() == name.lower()
                     and s.trigger.type in (QUEUE_TRIGGER, TIMER_TRIGGER)), None)
        if spec is None or self._invoker is None:
            return False
        value = (FunctionQueueMessage(id=str(uuid.uuid4()), body=text.encode("utf-8"), dequeue_count=1)
                 if spec.trigger.type == QUEUE_TRIGGER else TimerRequest(past_due=False))
        invoker = self._invoker

        def run() -> None:
            try:
                invoker.invoke(spec, value, reason="This function was programmatically called via the host APIs.")
            except Exception:
                pass  # logged by the invoker

        invoker.activity.begin()
        thread = threading.Thread(target=lambda: (run(), invoker.activity.end()), name=f"devhost-admin-{name}")
        thread.daemon = True
        thread.start()
        return True

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> bool:
        """Stop triggers, wait (bounded) for running invocations; True if everything finished."""
        grace = self.options.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + grace
        log.info("Application is shutting down...")
        # Signal everything first (cheap), then wait: the HTTP server takes a poll interval to stop.
        for listener in self._listeners:
            listener.stop_polling()
        for timer in self._timers:
            timer.stop()
        if self._http is not None:
            self._http.stop()
        for listener in self._listeners:
            listener.join_poller(max(0.0, deadline - time.monotonic()))
        drained = self._invoker.activity.wait_idle(max(0.0, deadline - time.monotonic())) if self._invoker else True
        if not drained:
            log.warning("Shutdown timeout (%gs) reached with invocations still running", grace)
        for timer in self._timers:
            timer.join(max(0.0, deadline - time.monotonic()))
        for listener in self._listeners:
            listener.close()
        if self._invoker is not None:
            self._invoker.shutdown()
        self._clients.close()
        log.info("Host stopped")
        return drained
