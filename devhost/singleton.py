"""A lease-based lock in queue storage, so only one devhost process runs each timer.

The Functions host makes timer listeners singletons with a blob lease in AzureWebJobsStorage.
Only the queue SDK is available here, so the lease is a queue holding a single token message:
whoever has received the token (and keeps it invisible by renewing it) holds the lock. If the
holder dies, the token becomes visible when its visibility timeout ends and another process
takes over, just as an expired blob lease would be taken over.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient

from devhost.storage import QueueClients

log = logging.getLogger("devhost.singleton")

LOCK_PERIOD = 15.0  # seconds, the host's default singleton lock period
TOKEN = "devhost-lock-token"


def lock_queue_name(host_id: str, lock_id: str) -> str:
    """A valid queue name per (host id, lock): hashed because host ids may hold any characters."""
    digest = hashlib.sha1(f"{host_id}/{lock_id}".encode("utf-8")).hexdigest()[:32]
    return f"devhost-lock-{digest}"


class QueueLock:
    def __init__(self, clients: QueueClients, client: QueueClient, *, period: float = LOCK_PERIOD,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self._clients = clients
        self._client = client
        self._period = max(3, int(period))
        self._on_lost = on_lost
        self._message_id: str | None = None
        self._pop_receipt: str | None = None
        self._guard = threading.Lock()
        self._stop_renewing = threading.Event()
        self._queue_ready = False
        self._misses = 0

    @property
    def held(self) -> bool:
        with self._guard:
            return self._message_id is not None

    def try_acquire(self) -> bool:
        if not self._queue_ready:  # once per process: every attempt costs storage transactions
            try:
                self._client.create_queue()
                self._clients.send(self._client, TOKEN, time_to_live=-1)
            except ResourceExistsError:
                pass
            self._queue_ready = True
        page = list(next(self._client.receive_messages(
            messages_per_page=1, max_messages=1, visibility_timeout=self._period).by_page(), []))
        if not page:
            self._misses += 1
            if self._misses % 4 == 0:  # a held lock is the usual reason; look for a lost token rarely
                self._repair_if_tokenless()
            return False
        self._misses = 0
        with self._guard:
            self._message_id, self._pop_receipt = page[0].id, page[0].pop_receipt
        self._stop_renewing.clear()
        threading.Thread(target=self._renew_loop, name="devhost-lock-renew", daemon=True).start()
        return True

    def _repair_if_tokenless(self) -> None:
        # A creator that died between creating the queue and sending the token would block the
        # lock forever. The count includes invisible messages, so 0 means there is no token at all.
        # (Two processes repairing at the same instant could both add one; acceptable locally.)
        if self._client.get_queue_properties().approximate_message_count == 0:
            log.warning("lock queue %s had no token; adding one", self._client.queue_name)
            self._clients.send(self._client, TOKEN, time_to_live=-1)

    def _renew_loop(self) -> None:
        while not self._stop_renewing.wait(self._period / 2):
            with self._guard:
                if self._message_id is None:
                    return
                try:
                    updated = self._client.update_message(self._message_id, pop_receipt=self._pop_receipt,
                                                          visibility_timeout=self._period)
                    self._pop_receipt = updated.pop_receipt
                    continue
                except Exception as exc:
                    log.warning("lost lock %s: %s", self._client.queue_name, exc)
                    self._message_id = self._pop_receipt = None
            self._on_lost()
            return

    def release(self) -> None:
        self._stop_renewing.set()
        with self._guard:
            message_id, pop_receipt = self._message_id, self._pop_receipt
            self._message_id = self._pop_receipt = None
        if message_id is None:
            return
        try:
            # Visible again at once, so another process can take over without waiting out the lease.
            self._client.update_message(message_id, pop_receipt=pop_receipt, visibility_timeout=0)
        except Exception as exc:
            log.warning("releasing lock %s failed (it expires by itself): %s", self._client.queue_name, exc)
