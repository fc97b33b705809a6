"""A storage queue modelled in memory on a simulated clock, for property tests of the rate gate.

It keeps the semantics the gate relies on: visibility timeouts, pop receipts that change on every
receive and update, stale receipts refused, metadata replaced whole, no ordering guarantee.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from shared.ratelimit.token_gate import RawToken


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Message:
    id: str
    content: str
    visible_at: float
    pop: str


class SimulatedQueue:
    def __init__(self, clock: Clock, rng: random.Random):
        self.clock = clock
        self.rng = rng
        self.messages: dict[str, _Message] = {}
        self.metadata: dict[str, str] = {}
        self._ids = itertools.count()

    def _pop(self) -> str:
        return f"p{next(self._ids)}"

    def receive(self, hold_seconds: int, max_count: int = 1) -> list[RawToken]:
        visible = [m for m in self.messages.values() if m.visible_at <= self.clock.now]
        self.rng.shuffle(visible)
        taken = []
        for m in visible[:max_count]:
            m.visible_at = self.clock.now + hold_seconds
            m.pop = self._pop()
            taken.append(RawToken(m.id, m.pop, m.content))
        return taken

    def update(self, token: RawToken, visible_in: int) -> None:
        m = self.messages.get(token.id)
        if m is None or m.pop != token.pop_receipt:
            return  # 404 / PopReceiptMismatch: the gate tolerates both
        m.visible_at = self.clock.now + visible_in
        m.pop = self._pop()

    def delete(self, token: RawToken) -> None:
        m = self.messages.get(token.id)
        if m is not None and m.pop == token.pop_receipt:
            del self.messages[token.id]

    def properties(self) -> tuple[dict[str, str], int]:
        return dict(self.metadata), len(self.messages)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self.metadata = dict(metadata)

    def send(self, content: str, visible_in: int) -> None:
        mid = f"m{next(self._ids)}"
        self.messages[mid] = _Message(mid, content, self.clock.now + visible_in, self._pop())

    def lose_one(self) -> None:
        if self.messages:
            del self.messages[self.rng.choice(sorted(self.messages))]


def max_in_window(arrivals: list[float], window: float) -> int:
    """Most arrivals inside any half-open window [t, t + window)."""
    times = sorted(arrivals)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
