"""Online calibration of the cost model's time constants, one estimator per replica.

The `cost` policy prices a request with four time constants (see `router.policies.cost`):

    request_overhead_s   a: fixed time of a prefill (per request)
    prefill_s_per_token  p: time per uncached prompt token
    decode_s_per_seq     d: step time added per running sequence
    decode_step_s        g: step time of a decode step with nothing else in it

Defaults come from one H100 fit; real engines differ by orders of magnitude. This module learns them from
what the router sees of every finished request, per replica, with no clock and no I/O (the policy feeds it
from ``on_dispatch`` / ``on_complete``). Each request gives up to two observations:

- **TTFT** (``TtftSample``): ``ttft = a * (1 + queued_requests) + p * (uncached + queued_tokens)
  + (g + d * running) * [running > 0]`` where ``uncached`` is the engine-reported ``prompt_tokens -
  cached_tokens``, ``queued_*`` is the prefill work the router believed was ahead of the request at
  dispatch and ``running`` the sequences decoding there (engine report when fresh, else router counters).
  The last term is the decode step a prefill shares (or waits for) when others are running.
- **decode** (``DecodeSample``): the time from first to last token, ``e2e - ttft``, over ``steps =
  completion_tokens - 1`` steps: ``steps * (g + d * running)``, where ``running`` is the mean of the
  replica's running count at dispatch and at completion. Prefill chunks of requests sent there meanwhile
  share those steps; the caller subtracts their estimated time (``a * requests + p * tokens`` with the
  current constants) first, so decode rows inform only ``d`` and ``g`` (which requests were really
  prefilled during this decode is only roughly known, and TTFT rows measure ``a`` and ``p`` directly).

The fit is least squares with exponential forgetting (``forgetting`` per observation, so the last
~1/(1 - forgetting) observations dominate and a replica whose timing drifts is followed), on *relative*
errors (each row divided by its target, so a 5 s TTFT and a 50 ms one count alike). Parameters are
fitted in units of their prior (``theta = prior * phi``), so the four are equally scaled, with a weak
ridge towards the prior (``prior_spread``: its standard deviation in units of the prior), which only
decides directions no observation has excited yet (e.g. ``decode_s_per_seq`` before two requests ever
ran together). Estimates stay within ``[prior / bound_factor, prior * bound_factor]`` (the exact
constrained optimum of a 4-parameter problem). After ``MIN_FOR_ROBUST`` observations, an observation
whose relative residual exceeds ``clip`` is down-weighted to it (Huber-like), so one preempted request
cannot throw the estimate. A constant whose effect is below the noise (a per-sequence cost of 6 us
beside a 6 ms step) is not identifiable and not needed: it stays wherever it fits best.

Modes (what `Calibrator.constants` returns):

- ``"relative"`` (the default): the prior scaled by the replica's *slowness*: its observed times over
  what one fit of the whole fleet predicts for the same requests, relative to a reference replica's,
  counted as 1 within ``deadband`` and before ``min_observations``. The fleet fit takes each
  observation divided by its replica's slowness, so it learns the shape of one engine; fitted on the
  raw times it explained part of a slow replica's times by what differs in its regressors (it runs
  more sequences *because* it is slow) and read a 2x slower replica as 1.3x. The reference is the
  lower median (the faster of the middle two): at low load a fleet may use two replicas, and the mean
  of two splits their difference (each within the deadband of it); the fastest of four would be
  biased by its luck (equal replicas read up to 1.33x of the fastest). Replicas never observed are
  priced as the reference. The shared decode step (`Calibrator.shared_step`) is priced at the fleet
  fit's step times per prefill token. In a fleet of equal replicas only
  the ratios between the constants matter to the cost policy, and there the configured ratios routed
  better than fitted ones (benchmarks/README.md, "Calibration matrix"); what calibration adds is
  telling a slower replica apart.
- ``"online"``: the replica's fitted constants.
- ``"pinned"``: always the prior; nothing is learned.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

MIN_FOR_ROBUST = 20  # observations before outliers are down-weighted
# once robust, the fit is solved again after this many new observations, not after each: a solve costs
# more than the fold, runs on the request path (up to four per finished request) and moves the estimate
# by about 1 - forgetting per observation, so the answer is at most this many observations behind
RESOLVE_EVERY = 8
# relative mode: a replica's own fit decides nothing (only `snapshot` shows it), so its observations are
# folded in when it is read or, warm in one go, when this many wait (bounded memory, same numbers)
PENDING_MAX = 64
# the parameters free (FREE) and at the lower bound (FIXED) in each of the 16 subsets `_solve` may try
_FREE = tuple(tuple(i for i in range(4) if mask >> i & 1) for mask in range(16))
_FIXED = tuple(tuple(i for i in range(4) if not mask >> i & 1) for mask in range(16))
NAMES = ("request_overhead_s", "prefill_s_per_token", "decode_s_per_seq", "decode_step_s")


@dataclass(frozen=True, slots=True)
class CostConstants:
    """The four time constants of the cost model, in seconds."""

    request_overhead_s: float
    prefill_s_per_token: float
    decode_s_per_seq: float
    decode_step_s: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.request_overhead_s, self.prefill_s_per_token, self.decode_s_per_seq, self.decode_step_s)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    """mode: "relative" (default: the configured constants times each replica's slowness relative to
        the fleet), "online" (each replica's fitted constants) or "pinned" (the configured constants);
        see the module docstring and benchmarks/README.md for which routes best.
    forgetting: weight kept by past observations at each new one, in (0.5, 1]; 0.99 ~ the last 100.
    bound_factor: learned constants (and slowness) stay within prior / f .. prior * f.
    clip: relative residual above which an observation is down-weighted (after MIN_FOR_ROBUST).
    prior_spread: prior standard deviation, in units of the prior value.
    deadband: relative: a slowness within 1/deadband .. deadband of the reference's counts as 1.
    min_observations: relative: observations of a replica before its slowness is used.
    """

    mode: Literal["pinned", "online", "relative"] = "relative"
    forgetting: float = 0.99
    bound_factor: float = 10_000.0
    clip: float = 0.5
    prior_spread: float = 1000.0
    deadband: float = 1.5
    min_observations: int = 30

    def __post_init__(self) -> None:
        if self.mode not in ("pinned", "online", "relative"):
            raise ValueError(f"calibration mode must be 'pinned', 'online' or 'relative', got {self.mode!r}")
        if not self.deadband >= 1.0 or self.min_observations < 1:
            raise ValueError("calibration deadband must be >= 1 and min_observations >= 1")
        if not 0.5 < self.forgetting <= 1.0:
            raise ValueError(f"calibration forgetting must be in (0.5, 1], got {self.forgetting}")
        if not self.bound_factor > 1.0:
            raise ValueError(f"calibration bound_factor must be > 1, got {self.bound_factor}")
        if not self.clip > 0 or not self.prior_spread > 0:
            raise ValueError("calibration clip and prior_spread must be > 0")

    @classmethod
    def of(cls, value: CalibrationSettings | Mapping[str, Any] | str | None) -> CalibrationSettings:
        """Accept settings, a mapping of their fields (config), a mode name, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, CalibrationSettings):
            return value
        if isinstance(value, str):
            return cls(mode=value)  # type: ignore[arg-type]
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"calibration has no setting(s) {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**value)


@dataclass(frozen=True, slots=True)
class TtftSample:
    """One request's time to first token and what the router knew when it sent it."""

    ttft_s: float
    uncached_tokens: float
    queued_tokens: float = 0.0
    queued_requests: float = 0.0
    running: float = 0.0

    def row(self) -> tuple[float, float, float, float]:
        busy = 1.0 if self.running > 0 else 0.0
        return (1.0 + self.queued_requests, self.uncached_tokens + self.queued_tokens, self.running * busy, busy)


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One request's decode phase: ``steps`` tokens after the first took ``decode_s``."""

    decode_s: float
    steps: float
    running: float

    def row(self) -> tuple[float, float, float, float]:
        return (0.0, 0.0, self.steps * self.running, self.steps)


class ReplicaCalibration:
    """Exponentially weighted least squares over relative errors for one replica (module docstring).

    Keeps the weighted normal equations ``A = sum w x x^T``, ``b = sum w x`` (rows already divided by
    their targets, so every target is 1) and solves them, within the bounds, when the constants are next
    read; that is a 4x4 problem, so the exact constrained optimum costs microseconds. Past the first
    MIN_FOR_ROBUST observations the solution is reused until RESOLVE_EVERY more are folded in (robust
    weights included), so a read is at most that many observations behind.
    """

    __slots__ = ("prior", "settings", "A", "b", "observations", "_phi", "_ridge", "_mask", "_pending", "_folded",
                 "_solved_at", "_shown")

    def __init__(self, prior: CostConstants, settings: CalibrationSettings) -> None:
        self.prior = prior.as_tuple()
        self.settings = settings
        self.A = [[0.0] * 4 for _ in range(4)]
        self.b = [0.0] * 4
        self.observations = 0  # accepted, folded in or pending
        self._folded = 0  # folded into A and b
        self._solved_at = 0  # `_folded` when `_phi` was last solved
        self._shown: tuple[list[float], CostConstants] | None = None  # `constants()` of that `_phi`
        self._pending: list[tuple[float, float, float, float]] = []  # scaled rows not folded in yet (`defer`)
        self._phi: list[float] | None = [1.0, 1.0, 1.0, 1.0]
        self._ridge = 1.0 / settings.prior_spread ** 2
        self._mask = 15  # free parameters of the last fit (warm start of the next)

    def observe(self, sample: TtftSample | DecodeSample) -> bool:
        """Fold one observation in; False (and nothing changes) if it carries no usable information."""
        if self.settings.mode == "pinned":
            return False
        return self._observe(sample.row(), sample.ttft_s if isinstance(sample, TtftSample) else sample.decode_s)

    def _observe(self, raw: tuple[float, float, float, float], y: float) -> bool:
        """`observe` of a regressor row and its measured time, folded in now."""
        x = self._scaled(raw, y)
        if x is None:
            return False
        self.observations += 1
        self._fold(x)
        return True

    def defer(self, raw: tuple[float, float, float, float], y: float) -> bool:
        """`_observe`, folded in later: when the fit is next read (`_solve`), or when PENDING_MAX rows
        wait. The fit is the same bits, since the rows are folded in the same order; only when differs."""
        x = self._scaled(raw, y)
        if x is None:
            return False
        self.observations += 1
        pending = self._pending
        pending.append(x)
        if len(pending) >= PENDING_MAX:
            self._catch_up()
        return True

    def _catch_up(self) -> None:
        rows, self._pending = self._pending, []
        for x in rows:
            self._fold(x)

    def _scaled(self, raw: tuple[float, float, float, float], y: float
                ) -> tuple[float, float, float, float] | None:
        """The row divided by its target in units of the prior, or None if it carries no information."""
        if not (y > 0 and math.isfinite(y)):
            return None
        r0, r1, r2, r3 = raw
        isfinite = math.isfinite
        if not (isfinite(r0) and r0 >= 0 and isfinite(r1) and r1 >= 0 and isfinite(r2) and r2 >= 0
                and isfinite(r3) and r3 >= 0):
            return None
        # Relative errors: divide the row by its target; fit phi where theta = prior * phi.
        p0, p1, p2, p3 = self.prior
        x0, x1, x2, x3 = r0 * p0 / y, r1 * p1 / y, r2 * p2 / y, r3 * p3 / y
        if not (x0 or x1 or x2 or x3):
            return None
        return x0, x1, x2, x3

    def _fold(self, x: tuple[float, float, float, float]) -> None:
        """Fold one scaled row into the normal equations. Runs once or twice per finished request, so it
        is written out element by element; every float operation is the one the loops it replaced did, in
        the same order, so the fit is bit-for-bit what it was."""
        x0, x1, x2, x3 = x
        weight = 1.0
        if self._folded >= MIN_FOR_ROBUST:  # down-weight outliers once the estimate means something
            f0, f1, f2, f3 = self._solve()
            resid = abs(1.0 - (0.0 + x0 * f0 + x1 * f1 + x2 * f2 + x3 * f3))
            if resid > self.settings.clip:
                weight = self.settings.clip / resid
        lam, b = self.settings.forgetting, self.b
        a0, a1, a2, a3 = self.A
        w0, w1, w2, w3 = weight * x0, weight * x1, weight * x2, weight * x3
        b[0], b[1], b[2], b[3] = lam * b[0] + w0, lam * b[1] + w1, lam * b[2] + w2, lam * b[3] + w3
        a0[0], a0[1], a0[2], a0[3] = lam * a0[0] + w0 * x0, lam * a0[1] + w0 * x1, lam * a0[2] + w0 * x2, lam * a0[3] + w0 * x3
        a1[0], a1[1], a1[2], a1[3] = lam * a1[0] + w1 * x0, lam * a1[1] + w1 * x1, lam * a1[2] + w1 * x2, lam * a1[3] + w1 * x3
        a2[0], a2[1], a2[2], a2[3] = lam * a2[0] + w2 * x0, lam * a2[1] + w2 * x1, lam * a2[2] + w2 * x2, lam * a2[3] + w2 * x3
        a3[0], a3[1], a3[2], a3[3] = lam * a3[0] + w3 * x0, lam * a3[1] + w3 * x1, lam * a3[2] + w3 * x2, lam * a3[3] + w3 * x3
        self._folded += 1
        if self._folded <= MIN_FOR_ROBUST or self._folded - self._solved_at >= RESOLVE_EVERY:
            self._phi = None

    def _solve(self) -> list[float]:
        """argmin sum w (1 - x.phi)^2 + ridge |phi - 1|^2 with lo <= phi, then clamped to hi.

        The objective is strictly convex (outer products plus a ridge), so the bound-constrained minimum
        is the one point meeting the KKT conditions. The last fit's set of free parameters (the rest at
        the lower bound) is tried first, then all free: either is the answer when it passes the check,
        which it almost always does (this runs once per RESOLVE_EVERY observations, on the request path).
        Otherwise every subset is tried and the best feasible one kept."""
        if self._pending:
            self._catch_up()
        if self._phi is not None:
            return self._phi
        self._solved_at = self._folded
        lo, hi = 1.0 / self.settings.bound_factor, self.settings.bound_factor
        r = self._ridge
        if self._mask == 15:  # the usual case, all free: `_subset_fit(A, b, 15, lo)` below on the same numbers
            (a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33) = self.A
            b0, b1, b2, b3 = self.b
            sol = _solve4([[a00 + r, a01 + 0.0, a02 + 0.0, a03 + 0.0, b0 + r],
                           [a10 + 0.0, a11 + r, a12 + 0.0, a13 + 0.0, b1 + r],
                           [a20 + 0.0, a21 + 0.0, a22 + r, a23 + 0.0, b2 + r],
                           [a30 + 0.0, a31 + 0.0, a32 + 0.0, a33 + r, b3 + r]])
            if sol is not None and not (sol[0] < lo or sol[1] < lo or sol[2] < lo or sol[3] < lo):
                x0, x1, x2, x3 = sol  # min(hi, x), NaN included: hi unless x < hi
                self._phi = [x0 if x0 < hi else hi, x1 if x1 < hi else hi, x2 if x2 < hi else hi,
                             x3 if x3 < hi else hi]
                return self._phi
        A = [[row[0] + 0.0, row[1] + 0.0, row[2] + 0.0, row[3] + 0.0] for row in self.A]
        for i in range(4):
            A[i][i] = self.A[i][i] + r
        b = [v + r for v in self.b]
        best: list[float] | None = None
        for mask in (self._mask, 15) if self._mask != 15 else (15,):
            phi = _subset_fit(A, b, mask, lo)
            if phi is not None:
                for i in _FIXED[mask]:  # KKT: no parameter at the bound would lower the objective by leaving it
                    row = A[i]
                    if not 0.0 + row[0] * phi[0] + row[1] * phi[1] + row[2] * phi[2] + row[3] * phi[3] >= b[i]:
                        break
                else:
                    best = phi
                    break
        else:
            best_obj = math.inf
            for candidate in range(15, -1, -1):
                phi = _subset_fit(A, b, candidate, lo)
                if phi is None:
                    continue
                obj = sum(phi[i] * A[i][j] * phi[j] for i in range(4) for j in range(4)) - 2 * sum(
                    b[i] * phi[i] for i in range(4))
                if obj < best_obj:
                    best, best_obj, mask = phi, obj, candidate
        self._mask = mask
        self._phi = [min(hi, v) for v in (best or [1.0] * 4)]
        return self._phi

    def constants(self) -> CostConstants:
        if self.settings.mode == "pinned":
            return CostConstants(*self.prior)
        phi = self._solve()
        shown = self._shown
        if shown is not None and shown[0] is phi:  # not solved again since: the same constants
            return shown[1]
        p0, p1, p2, p3 = self.prior
        constants = CostConstants(p0 * phi[0], p1 * phi[1], p2 * phi[2], p3 * phi[3])
        self._shown = (phi, constants)
        return constants


def _subset_fit(A: list[list[float]], b: list[float], mask: int, lo: float) -> list[float] | None:
    """The stationary point with the parameters in ``mask`` free and the others at ``lo``; None if
    singular or a free one falls below ``lo``."""
    if mask == 15:  # all free (b[i] - 0, as below, is b[i])
        sol = _solve4([row + [bi] for row, bi in zip(A, b, strict=True)])
        return None if sol is None or sol[0] < lo or sol[1] < lo or sol[2] < lo or sol[3] < lo else sol
    free = _FREE[mask]
    phi = [lo] * 4
    if free:
        fixed = _FIXED[mask]
        m = []  # the free rows of the system, augmented with their right-hand side
        for i in free:
            row = A[i]
            at_bound = 0  # sum()'s start: the same additions in the same order
            for j in fixed:
                at_bound += row[j] * lo
            m.append([row[j] for j in free] + [b[i] - at_bound])
        n = len(free)
        sol = _solve4(m) if n == 4 else _solve3(m) if n == 3 else _eliminate(m)
        if sol is None:
            return None
        for v in sol:
            if v < lo:
                return None
        for i, v in zip(free, sol, strict=True):
            phi[i] = v
    return phi


def _pivot(m: list[list[float]], c: int) -> list[float] | None:
    """Swap the first row (from ``c`` down) with the largest entry in column ``c`` into row ``c``; that
    row, or None when the largest is below 1e-12 (singular)."""
    p, top = c, abs(m[c][c])
    for r in range(c + 1, len(m)):
        v = abs(m[r][c])
        if v > top:
            p, top = r, v
    if top < 1e-12:
        return None
    m[c], m[p] = m[p], m[c]
    return m[c]


def _solve4(m: list[list[float]]) -> list[float] | None:
    """`_solve_linear` of a 4x4 system given as its augmented rows (changed in place), written out: the
    same pivots and the same float operations in the same order, so the same bits. Entries below the
    diagonal, which nothing reads after their column is eliminated, are not updated."""
    pv = _pivot(m, 0)
    if pv is None:
        return None
    d, q1, q2, q3, q4 = pv
    for row in (m[1], m[2], m[3]):
        f = row[0] / d
        row[1] -= f * q1
        row[2] -= f * q2
        row[3] -= f * q3
        row[4] -= f * q4
    pv = _pivot(m, 1)
    if pv is None:
        return None
    d, q2, q3, q4 = pv[1], pv[2], pv[3], pv[4]
    for row in (m[2], m[3]):
        f = row[1] / d
        row[2] -= f * q2
        row[3] -= f * q3
        row[4] -= f * q4
    pv = _pivot(m, 2)
    if pv is None:
        return None
    row = m[3]
    f = row[2] / pv[2]
    row[3] -= f * pv[3]
    row[4] -= f * pv[4]
    if abs(row[3]) < 1e-12:
        return None
    m0, m1, m2, m3 = m
    x3 = (m3[4] - 0) / m3[3]
    x2 = (m2[4] - (0.0 + m2[3] * x3)) / m2[2]
    x1 = (m1[4] - (0.0 + m1[2] * x2 + m1[3] * x3)) / m1[1]
    x0 = (m0[4] - (0.0 + m0[1] * x1 + m0[2] * x2 + m0[3] * x3)) / m0[0]
    return [x0, x1, x2, x3]


def _solve3(m: list[list[float]]) -> list[float] | None:
    """`_eliminate` of a 3x3 system (augmented rows, changed in place), written out like `_solve4`: the
    same pivots and float operations in the same order (the relative fleet fit usually has one parameter
    at its bound, so this runs once per observation). Entries below the diagonal are not updated."""
    m0, m1, m2 = m
    # column 0: the first row with the largest magnitude (strictly greater replaces), as `_pivot`
    p, top = 0, abs(m0[0])
    v = abs(m1[0])
    if v > top:
        p, top = 1, v
    v = abs(m2[0])
    if v > top:
        p, top = 2, v
    if top < 1e-12:
        return None
    if p == 1:
        m0, m1 = m1, m0
    elif p == 2:
        m0, m2 = m2, m0
    d, q1, q2, q3 = m0
    f = m1[0] / d
    m1[1] -= f * q1
    m1[2] -= f * q2
    m1[3] -= f * q3
    f = m2[0] / d
    m2[1] -= f * q1
    m2[2] -= f * q2
    m2[3] -= f * q3
    a, c = abs(m1[1]), abs(m2[1])
    if c > a:
        m1, m2, a = m2, m1, c
    if a < 1e-12:
        return None
    f = m2[1] / m1[1]
    m2[2] -= f * m1[2]
    m2[3] -= f * m1[3]
    if abs(m2[2]) < 1e-12:
        return None
    m[0], m[1], m[2] = m0, m1, m2
    x2 = (m2[3] - 0) / m2[2]
    x1 = (m1[3] - (0 + m1[2] * x2)) / m1[1]
    x0 = (m0[3] - (0 + m0[1] * x1 + m0[2] * x2)) / m0[0]
    return [x0, x1, x2]


def _solve_linear(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting (the first largest pivot); None when singular."""
    return _eliminate([row[:] + [b[i]] for i, row in enumerate(a)])


def _eliminate(m: list[list[float]]) -> list[float] | None:
    """`_solve_linear` of a system given as its augmented rows (changed in place)."""
    n = len(m)
    for c in range(n):
        pivot = _pivot(m, c)
        if pivot is None:
            return None
        d = pivot[c]
        for r in range(c + 1, n):
            row = m[r]
            f = row[c] / d
            for k in range(c, n + 1):
                row[k] -= f * pivot[k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = m[r]
        acc = 0  # sum()'s start: the same additions in the same order
        for k in range(r + 1, n):
            acc += row[k] * out[k]
        out[r] = (row[n] - acc) / row[r]
    return out


class Calibrator:
    """One `ReplicaCalibration` per replica name, all starting from the same prior."""

    def __init__(self, prior: CostConstants, settings: CalibrationSettings | None = None) -> None:
        self.prior = prior
        self.settings = settings or CalibrationSettings()
        self._replicas: dict[str, ReplicaCalibration] = {}
        self._reference: float | None = None  # the replicas' lower-median slowness (relative mode)
        # the slowness of replicas past min_observations, kept sorted as each changes, so the reference
        # after an observation costs O(log n), not a sort of the fleet on the next decision
        self._counted: dict[str, float] = {}
        self._sorted: list[float] = []
        # relative mode: one fit over the whole fleet, and per replica its observed / predicted times
        self._pooled = ReplicaCalibration(prior, self.settings)
        self._slowness: dict[str, list[float]] = {}
        # Versions a caller's caches of `constants` / `shared_step` can be keyed by (relative mode): other
        # replicas' constants change only when the reference does, the shared step whenever the fleet fit
        # does; so a cache invalidates the observed replica's entry, and all only when these moved.
        self.reference_version = 0  # bumped when the reference (lower median) changes value
        self.fleet_version = 0  # bumped when the fleet fit takes an observation
        self._median: float | None = None  # the reference value reference_version stands for
        self._fleet_steps: tuple[float, float, float, float] | None = None  # fleet fit's (overhead, per_token, per_seq, step)
        # forgetting sums of the TTFT rows' (requests, tokens) prefilled: the fleet's typical prefill, the
        # operating point `shared_step` converts units at
        self._typical = [0.0, 0.0]
        self._priced: dict[str, CostConstants] = {}  # relative: constants() until its inputs move

    @property
    def pinned(self) -> bool:
        return self.settings.mode == "pinned"

    def replica(self, name: str) -> ReplicaCalibration:
        cal = self._replicas.get(name)
        if cal is None:
            cal = self._replicas[name] = ReplicaCalibration(self.prior, self.settings)
        return cal

    def observe(self, name: str, sample: TtftSample | DecodeSample) -> bool:
        if self.pinned:
            return False
        cal = self.replica(name)
        raw = sample.row()
        y = sample.ttft_s if isinstance(sample, TtftSample) else sample.decode_s
        relative = self.settings.mode == "relative"
        if not (cal.defer(raw, y) if relative else cal._observe(raw, y)):
            return False
        if relative:
            if cal.observations == self.settings.min_observations:
                # reaching min_observations, the replica counts in the reference it is judged by (any
                # other time its slowness is unchanged since its last `_count`, which would be a no-op)
                self._count(name)
            self._reference = None
            pooled = self._pooled
            f0, f1, f2, f3 = pooled._solve()
            c0, c1, c2, c3 = pooled.prior
            r0, r1, r2, r3 = raw
            predicted = 0.0 + r0 * (c0 * f0) + r1 * (c1 * f1) + r2 * (c2 * f2) + r3 * (c3 * f3)
            # The fleet fit learns the shape of one unit-speed engine: each replica's observation enters
            # it divided by that replica's slowness, so a slow replica's times are not explained away by
            # what differs in its regressors (it runs more sequences because it is slow).
            pooled._observe(raw, y * (1.0 / self._ratio(name)))
            self.fleet_version += 1
            self._fleet_steps = None
            if isinstance(sample, TtftSample):
                typical, lam = self._typical, self.settings.forgetting
                typical[0], typical[1] = lam * typical[0] + r0, lam * typical[1] + r1
            if pooled.observations >= self.settings.min_observations:
                # Solved now, after the request, not in the next decision (`shared_step`): the same solve
                # of the same fit, which the next observation's prediction above would do anyway.
                self._fleet_steps = pooled.constants().as_tuple()
            if predicted > 0:
                sums = self._slowness.setdefault(name, [0.0, 0.0])
                lam = self.settings.forgetting
                sums[0], sums[1] = lam * sums[0] + y, lam * sums[1] + predicted
        self._count(name)
        self._reference = None
        self._priced.pop(name, None)
        self._note_reference()
        return True

    def _note_reference(self) -> None:
        """Bump `reference_version` if the lower median moved (the value `_ratio` reads next)."""
        known = self._sorted
        median = known[(len(known) - 1) // 2] if known else None
        if median != self._median:
            self._median = median
            self.reference_version += 1
            self._priced.clear()

    def _count(self, name: str) -> None:
        """Move ``name``'s slowness in the sorted list the fleet median is read from."""
        old = self._counted.pop(name, None)
        if old is not None:
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        cal = self._replicas.get(name)
        value = self._slow(name)
        if cal is not None and cal.observations >= self.settings.min_observations and value is not None:
            self._counted[name] = value
            bisect.insort(self._sorted, value)

    def _slow(self, name: str) -> float | None:
        sums = self._slowness.get(name)
        return sums[0] / sums[1] if sums and sums[1] > 0 else None

    def constants(self, name: str) -> CostConstants:
        """The constants the policy should price ``name`` with (see the module docstring's modes)."""
        cal = self._replicas.get(name)
        if cal is None or self.pinned:
            return self.prior
        if self.settings.mode == "online":
            return cal.constants()
        priced = self._priced.get(name)
        if priced is None:  # a replica's own slowness and the reference; both drop this when they move
            speed = self.speed(name)
            priced = self.prior if speed == 1.0 else CostConstants(*(c * speed for c in self.prior.as_tuple()))
            self._priced[name] = priced
        return priced

    def shared_step(self, name: str) -> tuple[float, float]:
        """(decode_step_s, decode_s_per_seq) of the decode step a new prefill shares on a busy replica,
        in the units `constants` prices ``name`` in. ``relative`` prices in the configured constants'
        units, whose ratios may be far from the engine's (a running sequence 0.5 prefill tokens on an
        H100, 75 on a slow-decode engine), so it takes the fleet fit's step times, converted at the
        fleet's typical prefill: the fit's prefill time of the observed requests' mean (requests,
        tokens) against the time `constants` prices the same prefill at. Converting per prefill token
        instead broke down where the fit cannot tell the per-request from the per-token cost (TTFT
        hardly growing with the prompt: per token fitted at its lower bound made a 14 ms step 135 s);
        the typical prefill's total is what the observations do pin down. The price of it: the other
        constants keep the prior's per-request : per-token ratio, so where an engine's differs the step
        keeps its share of a typical prefill but not its worth in prefill tokens (benchmarks.unseen u3-13:
        ratio 3,000 tokens against the prior's 100, a step priced at ~14 tokens where the engine's is
        ~210), and a busy replica holding a prefix looks cheap (benchmarks/README.md, u3-13)."""
        priced = self.constants(name)
        if self.settings.mode == "relative" and self._pooled.observations >= self.settings.min_observations:
            fleet = self._fleet_steps
            if fleet is None:  # solved by `observe`; kept for a fit read before any was
                fleet = self._fleet_steps = self._pooled.constants().as_tuple()
            overhead, per_token, per_seq, step = fleet
            m0, m1 = self._typical
            typical = overhead * m0 + per_token * m1
            if typical > 0:
                unit = (priced.request_overhead_s * m0 + priced.prefill_s_per_token * m1) / typical
                return step * unit, per_seq * unit
        return priced.decode_step_s, priced.decode_s_per_seq

    def speed(self, name: str) -> float:
        """How many times slower than the fleet's reference replica ``name`` is: its observed times over
        what one fit of the whole fleet predicts for the same requests, over the lower median of that
        ratio among the replicas with ``min_observations`` (1.0 when unknown or within the deadband)."""
        ratio = self._ratio(name)
        s = self.settings
        if 1.0 / s.deadband < ratio < s.deadband:
            return 1.0
        return min(s.bound_factor, max(1.0 / s.bound_factor, ratio))

    def _ratio(self, name: str) -> float:
        """``name``'s observed / fleet-predicted times over the reference's (1.0 when unknown)."""
        cal = self._replicas.get(name)
        s = self.settings
        own = self._slow(name)
        if cal is None or cal.observations < s.min_observations or own is None:
            return 1.0
        if self._reference is None:
            known = self._sorted
            self._reference = known[(len(known) - 1) // 2]  # the lower median
        return own / self._reference if self._reference > 0 else 1.0

    def observations(self, name: str) -> int:
        cal = self._replicas.get(name)
        return 0 if cal is None else cal.observations

    def remove(self, name: str) -> None:
        self._replicas.pop(name, None)
        self._slowness.pop(name, None)
        self._count(name)
        self._reference = None
        self._priced.pop(name, None)
        self._note_reference()

    def snapshot(self, name: str) -> dict[str, Any]:
        """What the admin API and metrics show for one replica."""
        shown: dict[str, Any] = {"mode": self.settings.mode, "observations": self.observations(name),
                                 **self.constants(name).as_dict()}
        if self.settings.mode == "relative":  # what is priced, plus what was fitted
            cal = self._replicas.get(name)
            shown["speed"] = self.speed(name)
            shown["fitted"] = cal.constants().as_dict() if cal is not None else None
        return shown
