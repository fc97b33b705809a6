"""Group commit for fast intake: POSTs answered at the same time by one process share one post, so
one received row and one envelope carry all of them (shared/intake/envelope.py).

The write is the cost of a POST (two storage round trips), and the queue door admits an envelope's
requests together, so a shared post makes both doors cheaper per request. There is no timer: the
first POST that finds no write in flight writes at once (no added wait when traffic is light); the
POSTs that arrive during that write wait for it to end and go out together in the next one, led by
the first of them. POSTs share a write only while their requests fit one envelope together, so a
shared write is one queue message, sent whole or not at all; a larger POST goes alone. Every POST
is answered only after the write that carries it succeeded; when it fails, every POST in it fails
the same way (each client then retries its own; nothing was answered 202 that is not durably
queued).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from shared.intake.validation import AcceptedRequest


# Writes the requests as one post under the given ids; returns them under their post's ids.
PostWriter = Callable[[list[AcceptedRequest]], list[AcceptedRequest]]


@dataclass
class _Waiting:
    accepted: list[AcceptedRequest]
    size: int
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    named: list[AcceptedRequest] | None = None
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        self._writing = False

    def submit(self, accepted: list[AcceptedRequest], size: int, write: PostWriter) -> list[AcceptedRequest]:
        """This POST's requests under their post's ids, once durably written (alone or with others
        whose sizes add up to at most max_size). Raises what the write raised."""
        me = _Waiting(accepted, size)
        with self._lock:
            self._waiting.append(me)
            if not self._writing:
                self._writing = me.leads = True
        if not me.leads:
            me.done.wait()
        if me.leads:
            self._lead(write)
        if me.error is not None:
            # The same instance in each thread (our errors cannot all be copied): only the traceback
            # it carries is shared, and the doors answer from the error's fields, not its traceback.
            raise me.error
        assert me.named is not None
        return me.named

    def _lead(self, write: PostWriter) -> None:
        with self._lock:
            batch = self._take()
        try:
            named = write([request for waiting in batch for request in waiting.accepted])
        except BaseException as exc:  # noqa: BLE001 - each waiting POST re-raises it in its own thread
            for waiting in batch:
                waiting.error = exc
        else:
            start = 0
            for waiting in batch:
                waiting.named, start = named[start:start + len(waiting.accepted)], start + len(waiting.accepted)
        with self._lock:
            if self._waiting:  # arrived during the write: the first of them leads the next one
                self._waiting[0].leads = True
                self._waiting[0].done.set()
            else:
                self._writing = False
        for waiting in batch:
            waiting.leads = False
            waiting.done.set()

    def _take(self) -> list[_Waiting]:
        """The leader and the POSTs behind it, in arrival order, while their sizes add up to at most
        max_size (a POST larger than that goes alone)."""
        batch = [self._waiting.popleft()]
        size = batch[0].size
        while self._waiting and size + self._waiting[0].size <= self.max_size:
            size += self._waiting[0].size
            batch.append(self._waiting.popleft())
        return batch
