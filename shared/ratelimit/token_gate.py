"""A durable rate lease: N token messages in a storage queue shared by every instance.

Holding a token = the message is invisible to everyone else. A caller receives a token with a
visibility timeout long enough to cover its Graph call, and after the call sets the token's
visibility so that it reappears no earlier than `window + margin` after the call was sent. So no
token can start more than one call per window, and there are only N tokens: at most N calls in
any window, whichever instance makes them. A crashed caller's token reappears when its hold ends.

A token is only as good as the hold that hides it, so every lease carries a deadline, `send_by`:
the last moment its request may start going on the wire (shared/graph/client.py checks it when
httpcore is about to write the request headers, and aborts the request if it has passed). A
caller stalled for any reason (a paused process, a slow identity endpoint or connection pool)
therefore never sends on a token that may already be in someone else's hands.

Seeding and repair mint a whole new *epoch*: the queue metadata names the one valid epoch and
tokens of any other epoch are deleted on sight. A taker reads the metadata right before each take
(one more queue transaction per call, a fraction of a cent per 100 000 calls) and trusts it for
`epoch_ttl` seconds from before the read: a lease's deadline never lies beyond that. New tokens
therefore first become visible `window + margin + epoch_ttl` after minting: by then no process
can send on an old-epoch token, and the old epoch's last call has left the window.

A 429 mints a new epoch whose tokens first appear after the Retry-After, so every token of the
old epoch, in flight or hidden, is dead for every instance within `epoch_ttl`: Graph keeps
counting calls made while it throttles
(https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling).

Minting never retries a put: a put whose answer was lost may have stored its token, and a
retried put would store a second one of the valid epoch. A put that failed leaves the pool
short instead, which the upkeep repairs by minting afresh (never more than N valid tokens).
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
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.queue import QueueClient

if TYPE_CHECKING:
    from shared.graph.client import SendTiming

log = logging.getLogger(__name__)

# How long a process trusts the epoch it read. It bounds how long after a re-seed (or a 429) an
# old token can still start a call, and it is part of every new epoch's wait before first use.
EPOCH_TTL_SECONDS = 2.0
# A queue message can stay hidden for 7 days at most
# (https://learn.microsoft.com/rest/api/storageservices/update-message).
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 60


@dataclass(frozen=True)
class RawToken:
    id: str
    pop_receipt: str
    content: str


class TokenStore(Protocol):
    """The queue operations the gate needs; a storage queue in production, a model in tests.
    Visibility is whole seconds, as the queue service takes it."""

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]: ...
    def update(self, token: RawToken, visible_in: int) -> str | None:
        """Set the token's visibility; the new pop receipt, or None if the receipt was stale or the token gone."""
    def delete(self, token: RawToken) -> None: ...
    def properties(self) -> tuple[dict[str, str], int]: ...
    def set_metadata(self, metadata: dict[str, str]) -> None: ...
    def send(self, content: str, visible_in: int) -> None:
        """Put a message once: no retry, since a put whose answer was lost may have been stored."""


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

    def update(self, token: RawToken, visible_in: int) -> str | None:
        return self.update_content(token, token.content, visible_in)

    def update_content(self, token: RawToken, content: str, visible_in: int) -> str | None:
        try:
            return self._queue.update_message(token.id, token.pop_receipt, content=content,
                                              visibility_timeout=visible_in).pop_receipt
        except (ResourceNotFoundError, HttpResponseError) as exc:
            # Our hold ran out and someone else has the message (or it was deleted as stale): the
            # hold timeout already guaranteed it reappeared late enough, so nothing is lost.
            log.warning("queue message %s could not be updated (%s); its hold has expired", token.id,
                        getattr(exc, "error_code", type(exc).__name__))
            return None

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
        # retry_total=0: the SDK would otherwise repeat a put whose answer was lost, storing a
        # second token of the valid epoch (R2 in shared/ratelimit/token_gate.py's docstring).
        self._queue.send_message(content, visibility_timeout=visible_in or None, time_to_live=-1, retry_total=0)


@dataclass
class Lease:
    token: RawToken
    send_by: float  # the gate's clock: a request not yet on the wire by then must not go at all
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
                 epoch_ttl: float = EPOCH_TTL_SECONDS, wall: Callable[[], float] = time.time):
        self.store = store
        self._start_timer = start_timer or _thread_timer
        self.calls = calls
        self.window = window
        self.margin = margin
        self.clock = clock
        self.wall = wall  # shared across instances (the pause in the queue metadata); `clock` is local
        # Long enough that a caller who dies mid-call cannot have its token reused within the window.
        self.hold_seconds = math.ceil(call_timeout + window + 2 * margin) + 1
        self.epoch_ttl = epoch_ttl
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
        # A repair during a throttling pause keeps the pause.
        return self._mint("no pool yet" if not epoch else f"only {count} of {self.calls} tokens left",
                          pause=_float(metadata.get("pausedUntil")) - self.wall())

    def _mint(self, reason: str, pause: float = 0.0) -> str:
        epoch = uuid.uuid4().hex
        first_visible = min(MAX_VISIBILITY_SECONDS,
                            math.ceil(max(self.window + self.margin + self.epoch_ttl, pause)))
        metadata = {"epoch": epoch, "calls": str(self.calls), "window": str(self.window)}
        if pause > 0:
            metadata["pausedUntil"] = f"{self.wall() + pause:.3f}"
        self.store.set_metadata(metadata)
        for n in range(self.calls):
            try:
                self.store.send(json.dumps({"epoch": epoch, "n": n}), first_visible)
            except AzureError as exc:
                # Stored or not, it is not sent again: a short pool is repaired by the next upkeep.
                log.warning("lease pool epoch %s: token %d not confirmed (%s); upkeep will re-mint",
                            epoch, n, type(exc).__name__)
                break
        log.info("lease pool minted epoch %s with %d tokens, first usable in %d s (%s)",
                 epoch, self.calls, first_visible, reason)
        return epoch

    # -- taking and giving back --------------------------------------------------------------
    def acquire(self) -> Lease | None:
        """Take a token if one is free now; None means 'no capacity now, defer the work'."""
        if self._epoch is None:
            self.ensure_pool()
        for _ in range(self.calls + 1):
            # Read right before the take (not between take and send): a re-seed or a 429's new
            # epoch reaches every taker within milliseconds, and a stall after it within epoch_ttl.
            self._read_epoch()
            asked_at = self.clock()
            tokens = self.store.receive(self.hold_seconds)
            if not tokens:
                if self.clock() - self._last_repair_check > 3 * self.window:
                    self.ensure_pool()
                return None
            token = tokens[0]
            # A mismatch may mean our view is stale rather than the token: look again first.
            epoch = _epoch_of(token.content)
            if epoch == self._epoch or epoch == self._read_epoch():
                return Lease(token, self._send_by(asked_at))
            self.store.delete(token)
            log.info("deleted lease token %s of a stale epoch", token.id)
        return None

    def _send_by(self, asked_at: float) -> float:
        # The hold started after `asked_at`, so the token is hidden until at least asked_at + hold;
        # a call sent by this deadline leaves window + margin before anyone else can have it. And
        # the epoch it belongs to is only trusted until the view's time is up.
        return min(asked_at + self.hold_seconds - self.window - self.margin, self._epoch_read_at + self.epoch_ttl)

    def _read_epoch(self) -> str | None:
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
                self._set_visibility(lease, self.visible_in(sent_at))

    def _set_visibility(self, lease: Lease, seconds: int) -> None:
        receipt = self.store.update(lease.token, seconds)
        if receipt is not None:
            lease.token = RawToken(lease.token.id, receipt, lease.token.content)
        lease.released = True

    def finish(self, lease: Lease, timing: "SendTiming") -> None:
        """After the call: make sure the token went back (or goes back now)."""
        if lease.timer is not None:
            lease.timer.join()
        elif timing.started is None:
            # Nothing went on the wire (no connection, a passed deadline): the call used no capacity.
            with lease.lock:
                self._set_visibility(lease, 0)
        else:
            # Headers went out but the body never finished: count from now.
            self._release(lease, None)

    def throttled(self, lease: Lease, seconds: float) -> None:
        """After a 429: no token of this pool may start a call for `seconds`, including the tokens
        of calls in flight or already handed back, because Graph counts calls made while it
        throttles. A new epoch whose tokens first appear after the pause retires them all."""
        if lease.timer is not None:
            lease.timer.join()
        self._mint(f"Graph throttled for {seconds:.0f} s", pause=seconds)


class Timer(Protocol):
    def join(self) -> None: ...


def _thread_timer(delay: float, fn: Callable[..., None], *args: object) -> Timer:
    timer = threading.Timer(delay, fn, args)
    timer.daemon = True
    timer.start()
    return timer


def _float(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def _epoch_of(content: str) -> str | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value.get("epoch") if isinstance(value, dict) else None
