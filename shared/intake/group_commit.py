"""Group commit: work that threads of one process hand in at the same time is done in one go.

Fast intake uses it at both doors. At the HTTP door, POSTs answered at the same time share one
post: one received row and one envelope carry all of them (shared/intake/envelope.py), where each
POST alone would cost two storage round trips. At the queue door, envelopes delivered together are
admitted together: one admission, one booking on the shared timeline, one request-row pass.

There is no timer: the first caller that finds nothing in flight goes at once (no added wait when
traffic is light); the callers that arrive meanwhile wait for it to end and go together in the
next round, led by the first of them. A round takes callers while their sizes add up to at most
`max_size` (a caller larger than that goes alone): at the HTTP door the size is envelope bytes, so
a shared post is one queue message, sent whole or not at all. Each caller gets back only its own
results, and only after the round that carried it succeeded; when a round fails, every caller in
it raises the same error (each then retries its own work; nothing was answered as done that is
not).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiting(Generic[T, R]):
    items: list[T]
    size: int
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    results: list[R] | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    def __init__(self, max_size: int):
        self.max_size = max_size
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting[T, R]] = deque()
        self._writing = False

    def submit(self, items: list[T], size: int, write: Callable[[list[T]], list[R]]) -> list[R]:
        """`write`'s results for these items (one per item, in order), done alone or together with
        other callers' items. `write` gets the items of a whole round and must return one result per
        item in the order given. Raises what the round's write raised."""
        me: _Waiting[T, R] = _Waiting(items, size)
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
        assert me.results is not None
        return me.results

    def _lead(self, write: Callable[[list[T]], list[R]]) -> None:
        with self._lock:
            batch = self._take()
        try:
            results = write([item for waiting in batch for item in waiting.items])
        except BaseException as exc:  # noqa: BLE001 - each waiting caller re-raises it in its own thread
            for waiting in batch:
                waiting.error = exc
        else:
            start = 0
            for waiting in batch:
                waiting.results, start = results[start:start + len(waiting.items)], start + len(waiting.items)
        with self._lock:
            if self._waiting:  # arrived during the write: the first of them leads the next round
                self._waiting[0].leads = True
                self._waiting[0].done.set()
            else:
                self._writing = False
        for waiting in batch:
            waiting.leads = False
            waiting.done.set()

    def _take(self) -> list[_Waiting[T, R]]:
        """The leader and the callers behind it, in arrival order, while their sizes add up to at
        most max_size."""
        batch = [self._waiting.popleft()]
        size = batch[0].size
        while self._waiting and size + self._waiting[0].size <= self.max_size:
            size += self._waiting[0].size
            batch.append(self._waiting.popleft())
        return batch
