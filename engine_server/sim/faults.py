"""Fault injection for reliability tests of the router: slow, failing, hanging and dropping replicas.

Each request draws its fate once, from an RNG seeded by the engine seed and the request id, so a replay
with the same ids fails the same requests regardless of how they interleave. The outcomes are exclusive:
one uniform draw falls into the error, hang or drop band (or none), so the rates are exact fractions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True, slots=True)
class FaultConfig:
    added_latency_s: float = 0.0  # real seconds slept before the request enters the engine
    error_rate: float = 0.0  # fraction answered with BackendError(500) before any output
    hang_rate: float = 0.0  # fraction that never yield anything (until the client cancels)
    drop_rate: float = 0.0  # fraction cut with StreamDropped after about half their tokens
    die_after_s: float | None = None  # the engine dies this long after start (0: start-up fails)

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.hang_rate, self.drop_rate)
        if self.die_after_s is not None and self.die_after_s < 0:
            raise ValueError("fault die_after_s must be >= 0")
        if self.added_latency_s < 0 or any(r < 0 or r > 1 for r in rates):
            raise ValueError("fault latency must be >= 0 and fault rates within [0, 1]")
        if sum(rates) > 1 + 1e-9:
            raise ValueError("error_rate + hang_rate + drop_rate must not exceed 1")

    @property
    def enabled(self) -> bool:
        return bool(self.added_latency_s or self.error_rate or self.hang_rate or self.drop_rate)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What happens to one request."""

    latency_s: float = 0.0
    error: bool = False
    hang: bool = False
    drop_after: int | None = None  # deliver this many tokens, then raise StreamDropped (0: before any)


NO_FAULTS = FaultPlan()


def plan_faults(config: FaultConfig, seed: int, request_id: str, max_tokens: int) -> FaultPlan:
    if not config.enabled:
        return NO_FAULTS
    key = f"fault:{request_id}".encode("utf-8", "surrogatepass")
    u = random.Random(xxhash.xxh64_intdigest(key, seed & 0xFFFFFFFFFFFFFFFF)).random()
    error = u < config.error_rate
    hang = not error and u < config.error_rate + config.hang_rate
    drop = not (error or hang) and u < config.error_rate + config.hang_rate + config.drop_rate
    return FaultPlan(
        latency_s=config.added_latency_s,
        error=error,
        hang=hang,
        drop_after=max_tokens // 2 if drop else None,
    )
