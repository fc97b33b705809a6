"""A durable rate lease: N token messages in a storage queue shared by every instance.

Holding a token = the message is invisible to everyone else. A caller receives a token with a
visibility timeout long enough to cover its Graph call, and after the call sets the token's
visibility so that it reappears no earlier than `window + margin` after the call was sent. So no
token can start more than one call per window, and there are only N tokens: at most N calls in
any window, whichever instance makes them. A crashed caller's token reappears when its hold ends.

Seeding and repair mint a whole new *epoch*: the queue metadata names the one valid epoch and
tokens of any other epoch are deleted on sight. Reading the metadata on every take would cost a
storage transaction per call, so each process trusts what it read for `epoch_ttl` seconds
(counted from before the read). New tokens therefore first become visible
`window + margin + epoch_ttl` after minting: by then no process can still be using an old epoch,
and the old epoch's last call has left the window.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.queue import QueueClient

if TYPE_CHECKING:
    from shared.graph.client import SendTiming

log = logging.getLogger(__name__)


@dataclass
class RawToken:
    id: str
    pop_receipt: str
    content: str


class TokenStore(Protocol):
    """The queue operations the gate needs; a storage queue in production, a model in tests."""

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]: ...
    def update(self, token: RawToken, visible_in: int) -> None:
        """Set the token's visibility; on success token.pop_receipt becomes the new receipt."""
    def delete(self, token: RawToken) -> None: ...
    def properties(self) -> tuple[dict[str, str], int]: ...
    def set_metadata(self, metadata: dict[str, str]) -> None: ...
    def send(self, content: str, visible_in: int) -> None: ...


class QueueTokenStore:
    """Token and timeline messages in a storage queue."""

    def __init__(self, queue: QueueClient):
        self._queue = queue
        try:
            queue.create_queue()
        except ResourceExistsError:
            pass

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]:
        messages = self._queue.receive_messages(messages_per_page=max_count, max_messages=max_count,
                                                visibility_timeout=hold_seconds)
        return [RawToken(m.id, m.pop_receipt, m.content) for m in messages]

    def update(self, token: RawToken, visible_in: int) -> None:
        try:
            updated = self._queue.update_message(token.id, token.pop_receipt, content=token.content,
                                                 visibility_timeout=visible_in)
            token.pop_receipt = updated.pop_receipt
        except (ResourceNotFoundError, HttpResponseError) as exc:
            # Our hold ran out and someone else has the token (or it was deleted as stale): the
            # hold timeout already guaranteed it reappeared late enough, so nothing is lost.
            log.warning("lease token %s could not be released (%s); its hold has expired", token.id,
                        getattr(exc, "error_code", type(exc).__name__))

    def update_content(self, token: RawToken, content: str, visible_in: int) -> None:
        try:
            self._queue.update_message(token.id, token.pop_receipt, content=content, visibility_timeout=visible_in)
        except (ResourceNotFoundError, HttpResponseError) as exc:
            log.warning("timeline message %s could not be updated (%s)", token.id,
                        getattr(exc, "error_code", type(exc).__name__))

    def is_empty(self) -> bool:
        return self.properties()[1] == 0

    def delete(self, token: RawToken) -> None:
        try:
            self._queue.delete_message(token.id, token.pop_receipt)
        except (ResourceNotFoundError, HttpResponseError):
            pass

    def properties(self) -> tuple[dict[str, str], int]:
        props = self._queue.get_queue_properties()
        return dict(props.metadata or {}), int(props.approximate_message_count or 0)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self._queue.set_queue_metadata(metadata)

    def send(self, content: str, visible_in: int) -> None:
        self._queue.send_message(content, visibility_timeout=visible_in or None, time_to_live=-1)


@dataclass
class Lease:
    token: RawToken
    taken_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    timer: Timer | None = None
    released: bool = False


def pool_queue_name(base: str, scope: str, service_principal_id: str, job_id: str) -> str:
    if scope == "tenant":
        return base
    key = service_principal_id if scope == "servicePrincipal" else f"{service_principal_id}/{job_id}"
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class RateGate:
    def __init__(self, store: TokenStore, calls: int, window: float, margin: float, call_timeout: float,
                 clock: Callable[[], float] = time.monotonic, start_timer: Callable[..., Timer] | None = None,
                 epoch_ttl: float | None = None):
        self.store = store
        self._start_timer = start_timer or _thread_timer
        self.calls = calls
        self.window = window
        self.margin = margin
        self.clock = clock
        # Long enough that a caller who dies mid-call cannot have its token reused within the window.
        self.hold_seconds = math.ceil(call_timeout + window + 2 * margin) + 1
        self.epoch_ttl = 3 * window if epoch_ttl is None else epoch_ttl
        self._epoch: str | None = None
        self._epoch_read_at = -math.inf
        self._last_repair_check = -math.inf

    # -- pool upkeep -------------------------------------------------------------------------
    def ensure_pool(self) -> str:
        """Seed the pool if it has no epoch or has lost tokens; safe when many instances race."""
        read_at = self.clock()
        metadata, count = self.store.properties()
        epoch = metadata.get("epoch")
        self._last_repair_check = read_at
        if epoch and count >= self.calls:
            self._epoch, self._epoch_read_at = epoch, read_at
            return epoch
        return self._mint(reason="no pool yet" if not epoch else f"only {count} of {self.calls} tokens left")

    def _mint(self, reason: str) -> str:
        epoch = uuid.uuid4().hex
        self.store.set_metadata({"epoch": epoch, "calls": str(self.calls), "window": str(self.window)})
        first_visible = math.ceil(self.window + self.margin + self.epoch_ttl)
        for n in range(self.calls):
            self.store.send(json.dumps({"epoch": epoch, "n": n}), first_visible)
        log.info("lease pool minted epoch %s with %d tokens (%s)", epoch, self.calls, reason)
        return epoch

    # -- taking and giving back --------------------------------------------------------------
    def acquire(self) -> Lease | None:
        """Take a token if one is free now; None means 'no capacity now, defer the work'."""
        if self._epoch is None:
            self.ensure_pool()
        for _ in range(self.calls + 1):
            tokens = self.store.receive(self.hold_seconds)
            if not tokens:
                if self.clock() - self._last_repair_check > max(self.window, self.epoch_ttl):
                    self.ensure_pool()
                return None
            token = tokens[0]
            if _epoch_of(token.content) == self._current_epoch(refresh=False):
                return Lease(token, self.clock())
            # A mismatch may mean our view is stale rather than the token: look again first.
            if _epoch_of(token.content) == self._current_epoch(refresh=True):
                return Lease(token, self.clock())
            self.store.delete(token)
            log.info("deleted lease token %s of a stale epoch", token.id)
        return None

    def _current_epoch(self, refresh: bool) -> str | None:
        if refresh or self.clock() - self._epoch_read_at >= self.epoch_ttl:
            read_at = self.clock()
            metadata, _ = self.store.properties()
            self._epoch, self._epoch_read_at = metadata.get("epoch"), read_at
        return self._epoch

    def visible_in(self, sent_at: float | None) -> int:
        """Whole seconds until the token may reappear: window + margin after the call was sent,
        or after now when we cannot know when the request reached Graph."""
        start = self.clock() if sent_at is None else sent_at
        # The 10 ms grace only absorbs float noise at the exact moment the timer aims for.
        return max(0, math.ceil(start + self.window + self.margin - self.clock() - 0.01))

    def on_sent(self, lease: Lease, sent_at: float) -> None:
        """Called the moment the request body is written: give the token back while the call is
        still in flight, timed so that it reappears exactly window + margin after `sent_at`.
        Visibility timeouts are whole seconds, so the update waits for the instant when the time
        left is a whole number (less than a second away) instead of rounding up to a second late."""
        span = self.window + self.margin
        delay = max(0.0, sent_at + (span - math.floor(span)) - self.clock())
        lease.timer = self._start_timer(delay, self._release, lease, sent_at)

    def _release(self, lease: Lease, sent_at: float | None) -> None:
        with lease.lock:
            if not lease.released:
                self.store.update(lease.token, self.visible_in(sent_at))
                lease.released = True

    def finish(self, lease: Lease, timing: "SendTiming") -> None:
        """After the call: make sure the token went back (or goes back now)."""
        if lease.timer is not None:
            lease.timer.join()
        elif timing.started is None:
            # Nothing went on the wire (no connection, say): the call used no capacity.
            with lease.lock:
                self.store.update(lease.token, 0)
                lease.released = True
        else:
            # Headers went out but the body never finished: count from now.
            self._release(lease, None)

    def hold_back(self, lease: Lease, seconds: float) -> None:
        """After a 429: keep this token and every free token out of use for `seconds`, because
        Graph counts calls made while it throttles."""
        hold = max(self.visible_in(None), math.ceil(seconds))
        if lease.timer is not None:
            lease.timer.join()
        with lease.lock:
            # Still invisible (it reappears a window after the call), so our receipt is valid.
            self.store.update(lease.token, hold)
            lease.released = True
        # Receiving a free token with this visibility is what hides it; nobody needs to give it back.
        self.store.receive(hold, max_count=self.calls)


class Timer(Protocol):
    def join(self) -> None: ...


def _thread_timer(delay: float, fn: Callable[..., None], *args: object) -> Timer:
    timer = threading.Timer(delay, fn, args)
    timer.daemon = True
    timer.start()
    return timer


def _epoch_of(content: str) -> str | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value.get("epoch") if isinstance(value, dict) else None
