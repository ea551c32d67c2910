"""A fleet-wide retry budget: retries may add at most a fixed share of the traffic.

Per-request `max_attempts` alone multiplies load exactly when the fleet can least take it: with every
replica answering 503 or 429, each request costs up to `max_attempts` calls. The budget bounds the
total instead (the scheme of Finagle and gRPC retry throttling): over the last `window_s` seconds,

    retries <= min_retries + ratio x requests

so with ratio 0.2 a failing fleet sees at most about 1.2 calls per request, plus `min_retries` per
window so that a quiet router can still retry the odd failure. A retry refused by the budget is not
made; the client gets the last failure (with the replica's Retry-After, if it sent one).

Counts live in `buckets` slots of window_s / buckets seconds each. Pure: time comes from `clock`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RetryBudget:
    def __init__(self, ratio: float, min_retries: int, window_s: float, *, buckets: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.window_s = window_s
        self._slot_s = window_s / buckets
        self._clock = clock
        self._slots: deque[list[float]] = deque()  # [slot start, requests, retries]
        self._requests = 0
        self._retries = 0

    def _current(self) -> list[float]:
        now = self._clock()
        while self._slots and self._slots[0][0] <= now - self.window_s:
            _, requests, retries = self._slots.popleft()
            self._requests -= int(requests)
            self._retries -= int(retries)
        if not self._slots or now >= self._slots[-1][0] + self._slot_s:
            self._slots.append([now, 0, 0])
        return self._slots[-1]

    def on_request(self) -> None:
        """A new client request (not a retry) arrived."""
        self._current()[1] += 1
        self._requests += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it."""
        slot = self._current()
        if self._retries >= self.min_retries + self.ratio * self._requests:
            return False
        slot[2] += 1
        self._retries += 1
        return True

    def same_limits(self, other: RetryBudget) -> bool:
        return (self.ratio, self.min_retries, self.window_s) == (other.ratio, other.min_retries, other.window_s)

    @property
    def counts(self) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        self._current()
        return self._requests, self._retries
