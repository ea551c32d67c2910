"""Replica health as a pure state machine: evidence in, admission decision out.

Envoy keeps host health apart from the load balancer's choice, and so does this router: the tracker only
answers "may a new request go there?"; policies never see failures, only the admitted replicas. Time is
an injected ``now`` (monotonic seconds), so every transition is testable without a clock or event loop.

States::

    healthy --(failures_to_eject passive failures | checks_to_eject failed checks)--> ejected
    ejected --(ejection time elapsed)--> half_open
    half_open --(trial request succeeds | successes_to_readmit good checks in a row)--> healthy
    half_open --(trial fails | a check fails)--> ejected, for twice as long

Evidence comes in two kinds: passive (outcomes of real requests: connect error, timeout, 5xx) and active
(the poller's ``GET /health``). Either can eject. An ejection always lasts its full time, even if checks
turn good meanwhile: that is the hysteresis that stops a flapping replica from being readmitted on every
good check. Each ejection doubles the next one (``base_ejection_s`` up to ``max_ejection_s``); after
``decay_after_s`` of uninterrupted health the doubling starts over. Good checks are counted from the
start of an ejection, so a replica that recovered while ejected is readmitted by the first good check
after its time is up; otherwise the first request after that time is the trial.

Draining (the engine said so, or an operator asked) is orthogonal: a draining replica is not admitted,
its state does not change, and passive failures seen meanwhile (typically "503 draining") are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

HealthState = Literal["healthy", "ejected", "half_open"]
HEALTHY: HealthState = "healthy"
EJECTED: HealthState = "ejected"
HALF_OPEN: HealthState = "half_open"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Thresholds and timings.

    failures_to_eject: consecutive passive failures (connect error, timeout, 5xx) that eject.
    checks_to_eject: consecutive failed active checks that eject.
    successes_to_readmit: consecutive good active checks that readmit a half-open replica.
    base_ejection_s: first ejection's length; each further ejection doubles it...
    max_ejection_s: ...up to this cap.
    decay_after_s: time continuously healthy after which the doubling starts over; None = 10 x base.
    trial_timeout_s: a half-open trial whose outcome never came back frees its slot after this long
        (a lost outcome must not park the replica in half-open forever).
    """

    failures_to_eject: int = 3
    checks_to_eject: int = 2
    successes_to_readmit: int = 2
    base_ejection_s: float = 5.0
    max_ejection_s: float = 120.0
    decay_after_s: float | None = None
    trial_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("failures_to_eject", "checks_to_eject", "successes_to_readmit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.base_ejection_s <= 0 or self.max_ejection_s < self.base_ejection_s:
            raise ValueError("need 0 < base_ejection_s <= max_ejection_s")
        if self.decay_after_s is not None and self.decay_after_s <= 0:
            raise ValueError("decay_after_s must be > 0")
        if self.trial_timeout_s <= 0:
            raise ValueError("trial_timeout_s must be > 0")

    @property
    def decay_s(self) -> float:
        return self.decay_after_s if self.decay_after_s is not None else 10 * self.base_ejection_s


@dataclass(frozen=True, slots=True)
class HealthTransition:
    """One state change, for metrics and logs. ``ejection_s`` is set when ``new`` is "ejected"."""

    old: HealthState
    new: HealthState
    reason: str
    at: float
    ejection_s: float = 0.0


class HealthTracker:
    """Health of one replica. Not thread-safe; meant for one event loop.

    Every ``record_*`` returns the transition it caused (or None) and also passes it to ``on_change``,
    so a caller can either look at the return value or install one hook for all sources.
    """

    def __init__(self, config: HealthConfig | None = None, *,
                 on_change: Callable[[HealthTransition], None] | None = None) -> None:
        self.config = config or HealthConfig()
        self.on_change = on_change
        self.state: HealthState = HEALTHY
        self.ejections = 0
        self.ejected_until = 0.0
        self.level = 0  # the next ejection lasts base * 2**level
        self.healthy_since = 0.0
        self.consecutive_failures = 0
        self.check_failures = 0
        self.check_successes = 0
        self.last_failure: str | None = None
        self._trial_started: float | None = None
        self._drain_sources: set[str] = set()

    # --- queries -----------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return bool(self._drain_sources)

    @property
    def trial_in_flight(self) -> bool:
        return self._trial_started is not None

    def refresh(self, now: float) -> HealthTransition | None:
        """Apply what time alone changes: an ejection running out, the doubling decaying, a lost trial."""
        cfg = self.config
        if self.state == EJECTED and now >= self.ejected_until:
            return self._move(HALF_OPEN, "ejection time elapsed", now)
        if self.state == HEALTHY and self.level and now - self.healthy_since >= cfg.decay_s:
            self.level = 0
        if self._trial_started is not None and now - self._trial_started >= cfg.trial_timeout_s:
            self._trial_started = None
        return None

    def available(self, now: float) -> bool:
        """Not ejected and not draining: the replica is part of the fleet right now (e.g. for /v1/models)."""
        self.refresh(now)
        return self.state != EJECTED and not self.draining

    def admits(self, now: float) -> bool:
        """May a new request go there: healthy, or half-open with its one trial slot free; never draining."""
        if not self.available(now):
            return False
        return self.state == HEALTHY or self._trial_started is None

    def next_ejection_s(self) -> float:
        """How long the next ejection would last."""
        return min(self.config.base_ejection_s * 2**self.level, self.config.max_ejection_s)

    # --- trials ------------------------------------------------------------------------------------

    def begin_trial(self, now: float) -> bool:
        """Claim the half-open trial slot before sending. True if the request may go (always when
        healthy); False if the replica is ejected, draining, or its trial is already out."""
        if not self.admits(now):
            return False
        if self.state == HALF_OPEN:
            self._trial_started = now
        return True

    def end_trial(self, now: float) -> None:
        """Give the trial slot back without a verdict (the client left, the dispatcher gave up)."""
        self._trial_started = None

    # --- evidence ----------------------------------------------------------------------------------

    def record_success(self, now: float) -> HealthTransition | None:
        """A request succeeded. In half-open this is the trial's success and readmits."""
        self.refresh(now)
        self.consecutive_failures = 0
        if self.state == HALF_OPEN:
            return self._move(HEALTHY, "trial request succeeded", now)
        return None  # healthy: nothing to do; ejected: a straggler from before the ejection

    def record_failure(self, now: float, kind: str) -> HealthTransition | None:
        """A request failed in a way that is the replica's fault (``kind``: connect, timeout, status, ...)."""
        self.refresh(now)
        if self.draining or self.state == EJECTED:
            return None  # draining refusals are expected; stragglers must not extend an ejection
        self.last_failure = kind
        if self.state == HALF_OPEN:
            return self._eject(f"trial request failed ({kind})", now)
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.failures_to_eject:
            return self._eject(f"{self.consecutive_failures} consecutive failures (last: {kind})", now)
        return None

    def record_check(self, ok: bool, now: float) -> HealthTransition | None:
        """An active health check's result."""
        self.refresh(now)
        if ok:
            self.check_failures = 0
            self.check_successes += 1
            if self.state == HALF_OPEN and self.check_successes >= self.config.successes_to_readmit:
                return self._move(HEALTHY, f"{self.check_successes} good health checks", now)
            return None
        self.check_successes = 0
        self.check_failures += 1
        self.last_failure = "health_check"
        if self.state == HALF_OPEN:
            return self._eject("health check failed while half-open", now)
        if self.state == HEALTHY and self.check_failures >= self.config.checks_to_eject:
            return self._eject(f"{self.check_failures} failed health checks", now)
        return None

    def set_draining(self, draining: bool, source: str = "engine") -> None:
        """Mark or clear draining. Sources are independent, so the poller clearing the engine's flag
        does not undo an operator's drain ("admin")."""
        if draining:
            self._drain_sources.add(source)
        else:
            self._drain_sources.discard(source)

    # --- internals ---------------------------------------------------------------------------------

    def _eject(self, reason: str, now: float) -> HealthTransition:
        duration = self.next_ejection_s()
        if self.config.base_ejection_s * 2**self.level < self.config.max_ejection_s:
            self.level += 1
        self.ejected_until = now + duration
        self.ejections += 1
        self.consecutive_failures = 0
        self.check_successes = 0
        self._trial_started = None
        return self._move(EJECTED, reason, now, duration)

    def _move(self, new: HealthState, reason: str, now: float, ejection_s: float = 0.0) -> HealthTransition:
        old, self.state = self.state, new
        if new == HEALTHY:
            self.healthy_since = now
            self.consecutive_failures = 0
            self.check_failures = 0
            self._trial_started = None
        transition = HealthTransition(old, new, reason, now, ejection_s)
        if self.on_change is not None:
            self.on_change(transition)
        return transition
