"""Queue trigger listener with the WebJobs Storage Queues extension's semantics.

- Receives up to batchSize messages at a time and hides them for a lease (10 minutes, renewed
  at half-time while the function runs, as the extension does), runs them in parallel, and
  fetches the next batch once no more than newBatchThreshold are still in flight.
- Polls again at once after a non-empty poll; after empty polls backs off exponentially from
  100 ms (randomised) up to maxPollingInterval. A write to the queue from this process (through
  a queue output binding) wakes the listener immediately.
- Success deletes the message. Failure makes it visible again after visibilityTimeout, until
  the dequeue count reaches maxDequeueCount: then it is copied to `<queue>-poison` and deleted.
  A message received with a dequeue count already above the limit goes to poison unprocessed.

All state lives in the queue service, so any number of devhost processes can share a queue:
each message is hidden from the others while one of them holds it.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from azure.functions.queue import QueueMessage as FunctionQueueMessage
from azure.storage.queue import QueueMessage

from devhost.functions import FunctionSpec
from devhost.host_config import QueueOptions
from devhost.invocation import Invoker, trigger_type_hint
from devhost.storage import (MessageDecodeError, QueueClients, QueueWatcher, decode_message,
                             validate_queue_name)

log = logging.getLogger("devhost.queue")

MIN_POLLING_INTERVAL = 0.1
DEFAULT_MESSAGE_LEASE = 600.0  # the extension's 10-minute visibility while a message is processed
POISON_SUFFIX = "-poison"


class ListenerStartError(RuntimeError):
    """The trigger's queue cannot be reached or created."""


class Backoff:
    """Randomised exponential back-off between empty polls."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self._minimum = minimum
        self._maximum = max(minimum, maximum)
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        # Jitter keeps several hosts on one queue from polling in lock step.
        delay = self._minimum * (2 ** min(self._attempt, 30)) * random.uniform(0.8, 1.2)
        self._attempt += 1
        return min(delay, self._maximum)


@dataclass
class _Lease:
    """The current pop receipt of a message we hold; renewals replace it."""

    message: QueueMessage
    pop_receipt: str
    hidden_until: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False


class QueueListener:
    def __init__(self, spec: FunctionSpec, clients: QueueClients, watcher: QueueWatcher, invoker: Invoker,
                 options: QueueOptions, *, message_lease: float = DEFAULT_MESSAGE_LEASE) -> None:
        self.spec = spec
        self.queue_name = validate_queue_name(str(spec.trigger.get("queueName", "")),
                                              f"function '{spec.name}' queueName")
        connection = spec.trigger.get("connection")
        self._clients = clients
        self._client = clients.queue(connection, self.queue_name)
        self._poison = clients.queue(connection, validate_queue_name(
            self.queue_name + POISON_SUFFIX, f"function '{spec.name}' poison queue"))
        self._watcher = watcher
        self._invoker = invoker
        self._options = options
        self._lease_seconds = max(1.0, message_lease)
        self._hint = trigger_type_hint(spec)
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._capacity = threading.Condition()
        self._in_flight = 0
        self._leases: dict[str, _Lease] = {}
        self._leases_lock = threading.Lock()
        # Enough threads for every message the threshold rule lets us hold at once.
        self._dispatch = ThreadPoolExecutor(max_workers=options.batch_size + options.new_batch_threshold,
                                            thread_name_prefix=f"devhost-queue-{self.queue_name}")
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._clients.ensure_exists(self._client)
        except Exception as exc:
            raise ListenerStartError(f"the listener for function '{self.spec.name}' cannot reach queue "
                                     f"'{self.queue_name}' ({self._client.url}): {exc}") from exc
        self._watcher.subscribe(self._client.url, self.wake)
        for target, name in ((self._poll_loop, "poll"), (self._renew_loop, "renew")):
            thread = threading.Thread(target=target, name=f"devhost-{name}-{self.queue_name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop_polling(self) -> None:
        """Stop fetching; messages already fetched but not started are handed back to the queue."""
        self._stopping.set()
        self._wake.set()
        with self._capacity:
            self._capacity.notify_all()

    def join_poller(self, timeout: float) -> None:
        if self._threads:
            self._threads[0].join(timeout)

    def close(self) -> None:
        self.stop_polling()
        self._closed.set()
        self._dispatch.shutdown(wait=False, cancel_futures=True)

    # -- polling ---------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        backoff = Backoff(MIN_POLLING_INTERVAL, self._options.max_polling_interval)
        while not self._stopping.is_set():
            with self._capacity:
                self._capacity.wait_for(
                    lambda: self._stopping.is_set() or self._in_flight <= self._options.new_batch_threshold)
            if self._stopping.is_set():
                break
            # Cleared before receiving: a wake-up that arrives during the call is not lost. A stop
            # whose wake-up this clear erased has already set _stopping (it is set first).
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                messages = self._receive()
            except Exception as exc:  # storage hiccup: log and back off like an empty poll
                log.warning("Polling queue '%s' failed: %s", self.queue_name, exc)
                messages = []
            if messages:
                backoff.reset()
                for message in messages:
                    self._dispatch_message(message)
                continue
            delay = backoff.next()
            log.debug("Queue '%s': empty poll, next poll in %.2fs", self.queue_name, delay)
            if self._wake.wait(delay):
                log.debug("Queue '%s': woken early (local write or shutdown)", self.queue_name)
                backoff.reset()

    def _receive(self) -> list[QueueMessage]:
        batch = self._options.batch_size
        pages = self._client.receive_messages(messages_per_page=batch, max_messages=batch,
                                              visibility_timeout=int(self._lease_seconds)).by_page()
        # One request only: the paged iterator would otherwise keep draining the queue.
        return list(next(pages, []))

    def _dispatch_message(self, message: QueueMessage) -> None:
        lease = _Lease(message, message.pop_receipt or "", time.monotonic() + self._lease_seconds)
        with self._leases_lock:
            self._leases[message.id] = lease
        with self._capacity:
            self._in_flight += 1
        # Counted as host activity from now on, so shutdown waits until it is handled or handed back.
        self._invoker.activity.begin()
        try:
            self._dispatch.submit(self._handle, lease)
        except RuntimeError:  # pool already shut down: give the message back
            self._finish(lease)
            try:
                self._release(lease, 0)
            except Exception:
                log.debug("handing back message %s failed", message.id, exc_info=True)

    def _finish(self, lease: _Lease) -> None:
        with lease.lock:
            lease.finished = True
        with self._leases_lock:
            self._leases.pop(lease.message.id, None)
        with self._capacity:
            self._in_flight -= 1
            self._capacity.notify_all()
        self._invoker.activity.end()

    # -- lease renewal ---------------------------------------------------------------------
    def _renew_loop(self) -> None:
        interval = min(self._lease_seconds / 4, 30.0)
        while not self._closed.wait(interval):
            with self._leases_lock:
                leases = list(self._leases.values())
            now = time.monotonic()
            for lease in leases:
                if lease.hidden_until - now > self._lease_seconds / 2:
                    continue
                with lease.lock:
                    if lease.finished:
                        continue
                    try:
                        updated = self._client.update_message(
                            lease.message.id, pop_receipt=lease.pop_receipt,
                            visibility_timeout=int(self._lease_seconds))
                        lease.pop_receipt = updated.pop_receipt or lease.pop_receipt
                        lease.hidden_until = time.monotonic() + self._lease_seconds
                    except Exception as exc:
                        log.warning("Queue '%s' message %s: renewing its lease failed: %s",
                                    self.queue_name, lease.message.id, exc)

    # -- processing ------------------------------------------------------------------------
    def _handle(self, lease: _Lease) -> None:
        message = lease.message
        begin = time.monotonic()
        dequeue_count = message.dequeue_count or 1
        max_count = self._options.max_dequeue_count
        try:
            if self._stopping.is_set():
                outcome = self._release(lease, 0, "handed back (host stopping)")
            elif dequeue_count > max_count:
                outcome = self._to_poison(lease, f"dequeue count exceeds maxDequeueCount {max_count}")
            else:
                outcome = self._run(lease, dequeue_count, max_count)
        except Exception as exc:  # storage call failed while settling the message
            outcome = f"not settled: {exc} (it reappears when its lease ends)"
        finally:
            self._finish(lease)
        log.info("Queue '%s' message %s for 'Functions.%s': dequeue count %d, %s, %dms",
                 self.queue_name, message.id, self.spec.name, dequeue_count, outcome,
                 (time.monotonic() - begin) * 1000)

    def _run(self, lease: _Lease, dequeue_count: int, max_count: int) -> str:
        message = lease.message
        try:
            body = decode_message(message.content, self._options.message_encoding)
            self._invoker.invoke(self.spec, self._trigger_value(message, body),
                                 reason=f"New queue message detected on '{self.queue_name}'.")
        except Exception as exc:
            if isinstance(exc, MessageDecodeError):
                log.error("Queue '%s' message %s cannot be decoded (messageEncoding=%s): %s",
                          self.queue_name, message.id, self._options.message_encoding, exc)
            if dequeue_count >= max_count:
                return self._to_poison(lease, f"failed {dequeue_count} time(s)")
            return self._release(lease, self._options.visibility_timeout,
                                 f"failed, retry in {self._options.visibility_timeout:g}s")
        with lease.lock:
            self._client.delete_message(message.id, pop_receipt=lease.pop_receipt)
        return "succeeded"

    def _trigger_value(self, message: QueueMessage, body: bytes) -> Any:
        # The worker converts by the parameter's annotation: str and bytes get the bare body.
        if self._hint is str:
            return body.decode("utf-8")
        if self._hint is bytes:
            return body
        return FunctionQueueMessage(
            id=message.id, body=body, pop_receipt=message.pop_receipt, dequeue_count=message.dequeue_count,
            expiration_time=message.expires_on, insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on)

    def _release(self, lease: _Lease, visibility_timeout: float, outcome: str = "released") -> str:
        with lease.lock:
            self._client.update_message(lease.message.id, pop_receipt=lease.pop_receipt,
                                        visibility_timeout=int(visibility_timeout))
        return outcome

    def _to_poison(self, lease: _Lease, why: str) -> str:
        # Copy the wire content unchanged so the poison message decodes like the original.
        self._clients.ensure_exists(self._poison)
        self._clients.send(self._poison, lease.message.content or "", time_to_live=-1)
        with lease.lock:
            self._client.delete_message(lease.message.id, pop_receipt=lease.pop_receipt)
        self._watcher.notify(self._poison.url)
        log.warning("Queue '%s' message %s moved to '%s' (%s)", self.queue_name, lease.message.id,
                    self._poison.queue_name, why)
        return f"{why}, moved to '{self._poison.queue_name}'"
