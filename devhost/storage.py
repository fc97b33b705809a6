"""Queue storage access shared by triggers, output bindings and the timer lock.

Uses the real azure-storage-queue SDK with its default (plain text) message policies; the
host's `messageEncoding` is applied here so base64 and raw text behave exactly like the
Storage Queues extension on the wire.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.queue import LinearRetry, QueueClient, QueueServiceClient

from devhost.azurite import ACCOUNT, ACCOUNT_KEY

log = logging.getLogger("devhost.storage")

DEFAULT_CONNECTION = "AzureWebJobsStorage"
# What `UseDevelopmentStorage=true` means to the SDKs: Azurite on its default ports.
DEVELOPMENT_STORAGE = (
    f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
    f"BlobEndpoint=http://127.0.0.1:10000/{ACCOUNT};"
    f"QueueEndpoint=http://127.0.0.1:10001/{ACCOUNT};"
    f"TableEndpoint=http://127.0.0.1:10002/{ACCOUNT};"
)
_QUEUE_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


class StorageConfigError(RuntimeError):
    """A connection setting or queue name the host would refuse at startup."""


class MessageDecodeError(ValueError):
    """A queue message is not valid for the configured messageEncoding."""


def validate_queue_name(name: str, where: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise StorageConfigError(
            f"{where}: {name!r} is not a valid queue name (3-63 lowercase letters, digits and single dashes)")
    return name


def resolve_connection_string(connection: str | None, environ: Mapping[str, str]) -> str:
    """The connection string a binding's `connection` names, looked up as the host does.

    The host tries the setting itself, then `AzureWebJobs<name>`; an empty name means
    AzureWebJobsStorage.
    """
    name = connection or DEFAULT_CONNECTION
    for candidate in (name, f"AzureWebJobs{name}"):
        value = environ.get(candidate)
        if value:
            break
    else:
        raise StorageConfigError(
            f"storage connection setting '{name}' is not set (looked for {name} and AzureWebJobs{name})")
    if value.replace(" ", "").lower().startswith("usedevelopmentstorage=true"):
        return DEVELOPMENT_STORAGE
    return value


def encode_message(body: str | bytes, encoding: str) -> str:
    """Text to put on the wire for one output message."""
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    # "none": the service stores text, so bytes must be UTF-8 to survive the round trip.
    return raw.decode("utf-8")


def decode_message(content: str | None, encoding: str) -> bytes:
    """Body bytes of a received message; MessageDecodeError when base64 content is not base64."""
    text = content or ""
    if encoding == "base64":
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise MessageDecodeError(f"message is not valid base64: {exc}") from exc
    return text.encode("utf-8")


class QueueWatcher:
    """In-process wake-up signals, keyed by queue URL.

    The Functions host's SharedQueueWatcher does the same: when a function writes to a queue this
    process also listens on, the listener polls at once instead of waiting out its back-off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Callable[[], None]]] = defaultdict(list)

    def subscribe(self, queue_url: str, wake: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers[queue_url].append(wake)

    def notify(self, queue_url: str) -> None:
        with self._lock:
            wakers = list(self._subscribers.get(queue_url, ()))
        for wake in wakers:
            wake()


class QueueClients:
    """Caches one SDK client per (connection string, queue) and remembers created queues."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._lock = threading.Lock()
        self._services: dict[str, QueueServiceClient] = {}
        self._queues: dict[tuple[str, str], QueueClient] = {}
        self._known_to_exist: set[str] = set()

    def queue(self, connection: str | None, queue_name: str) -> QueueClient:
        conn_str = resolve_connection_string(connection, self._environ)
        with self._lock:
            key = (conn_str, queue_name)
            client = self._queues.get(key)
            if client is None:
                service = self._services.get(conn_str)
                if service is None:
                    # Few retries and short timeouts: a stopped emulator should surface as an error
                    # in the log within seconds, not hang a poll loop for minutes.
                    service = QueueServiceClient.from_connection_string(
                        conn_str, retry_policy=LinearRetry(backoff=1, random_jitter_range=0.5, retry_total=3),
                        connection_timeout=5, read_timeout=30)
                    self._services[conn_str] = service
                client = self._queues[key] = service.get_queue_client(queue_name)
            return client

    def ensure_exists(self, client: QueueClient) -> None:
        if client.url in self._known_to_exist:
            return
        try:
            client.create_queue()
        except ResourceExistsError:
            pass
        with self._lock:
            self._known_to_exist.add(client.url)

    def send(self, client: QueueClient, content: str, *, time_to_live: int | None = None) -> None:
        """Send one message, creating the queue on first use like the host's queue output binding."""
        kwargs: dict[str, Any] = {} if time_to_live is None else {"time_to_live": time_to_live}
        try:
            client.send_message(content, **kwargs)
        except ResourceNotFoundError:
            with self._lock:
                self._known_to_exist.discard(client.url)
            self.ensure_exists(client)
            client.send_message(content, **kwargs)

    def close(self) -> None:
        with self._lock:
            services = list(self._services.values())
            queues = list(self._queues.values())
            self._services.clear()
            self._queues.clear()
        for client in [*queues, *services]:
            try:
                client.close()
            except Exception:  # closing is best effort at shutdown
                log.debug("closing a queue client failed", exc_info=True)
