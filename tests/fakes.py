"""A storage queue modelled in memory on a simulated clock, for property tests of the rate gate.

It keeps the semantics the gate relies on: visibility timeouts in whole seconds (1 s to 7 days;
anything else is refused like the service's 400), pop receipts that change on every receive and
update, stale receipts refused, metadata replaced whole, no ordering guarantee. A put can lose
its answer after the message was stored (`lost_put_rate`), which is what makes an SDK retry store
a second copy.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from azure.core.exceptions import HttpResponseError, ServiceResponseError

from shared.ratelimit.token_gate import RawToken

MAX_VISIBILITY = 7 * 24 * 3600


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass
class _Message:
    id: str
    content: str
    visible_at: float
    pop: str


def _whole_seconds(value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= MAX_VISIBILITY:
        raise HttpResponseError(message=f"visibilitytimeout must be whole seconds in [{least}, {MAX_VISIBILITY}], "
                                        f"got {value!r}")
    return value


class SimulatedQueue:
    def __init__(self, clock: Clock, rng: random.Random, lost_put_rate: float = 0.0):
        self.clock = clock
        self.rng = rng
        self.lost_put_rate = lost_put_rate
        self.messages: dict[str, _Message] = {}
        self.metadata: dict[str, str] = {}
        self._ids = itertools.count()

    def _pop(self) -> str:
        return f"p{next(self._ids)}"

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]:
        hold = _whole_seconds(hold_seconds, 1)
        visible = [m for m in self.messages.values() if m.visible_at <= self.clock.now]
        self.rng.shuffle(visible)
        taken = []
        for m in visible[:max_count]:
            m.visible_at = self.clock.now + hold
            m.pop = self._pop()
            taken.append(RawToken(m.id, m.pop, m.content))
        return taken

    def update(self, token: RawToken, visible_in: int) -> str | None:
        return self.update_content(token, token.content, visible_in)

    def update_content(self, token: RawToken, content: str, visible_in: int) -> str | None:
        seconds = _whole_seconds(visible_in, 0)
        m = self.messages.get(token.id)
        if m is None or m.pop != token.pop_receipt:
            return None  # 404 / PopReceiptMismatch
        m.content, m.visible_at, m.pop = content, self.clock.now + seconds, self._pop()
        return m.pop

    def delete(self, token: RawToken) -> None:
        m = self.messages.get(token.id)
        if m is not None and m.pop == token.pop_receipt:
            del self.messages[token.id]

    def properties(self) -> tuple[dict[str, str], int]:
        return dict(self.metadata), len(self.messages)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self.metadata = dict(metadata)

    def send(self, content: str, visible_in: int) -> None:
        seconds = _whole_seconds(visible_in, 0)
        mid = f"m{next(self._ids)}"
        self.messages[mid] = _Message(mid, content, self.clock.now + seconds, self._pop())
        if self.rng.random() < self.lost_put_rate:
            raise ServiceResponseError("the connection closed before the answer to Put Message arrived")

    def is_empty(self) -> bool:
        return not self.messages

    def lose_one(self) -> None:
        if self.messages:
            del self.messages[self.rng.choice(sorted(self.messages))]

    def valid_tokens(self) -> int:
        """Tokens of the epoch the metadata names: the pool's real capacity."""
        epoch = self.metadata.get("epoch")
        return sum(f'"epoch": "{epoch}"' in m.content for m in self.messages.values())


def max_in_window(arrivals: list[float], window: float) -> int:
    """Most arrivals inside any half-open window [t, t + window)."""
    times = sorted(arrivals)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
