"""The cyclic garbage collector's settings for a long-running router process.

Why: CPython runs a young-generation pass every 700 net new container objects and a full pass, which
walks every live object (the router's long-lived state included), every so often; either lands inside
whatever request is running. Measured on `benchmarks.overhead` (1 and 32 streams): with the defaults a
young pass every ~330 requests (up to 1 ms, a middle one up to 3.8 ms), ~0.5 % of the router's CPU;
tuned as below, none in 20,000 requests, and RSS flat but for the prefix index's own growth. So:

- `Tuning.apply` at start-up: collect (in full the first time in a process), then `gc.freeze()` what is
  alive (modules, config, app, policy, replica records), which full passes then skip (measured before:
  37-70 ms pauses without), and raise the young threshold to `GEN0_THRESHOLD`. The garbage waiting
  meanwhile is bounded by that threshold (a few MB).
- `Tuning.refresh` after the router is rebuilt (a reload that replaces the policy or dispatcher):
  unfreeze, collect, freeze again. The replaced parts were frozen at start-up and some sit in reference
  cycles (a dispatcher and its bound decision hook), which a frozen object never has collected.
- `Tuning.release` at shutdown restores the previous settings (tests start many routers in one process).

Nothing here decides anything about a request; ``gc_tuning: false`` in the config leaves the collector as
CPython sets it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

GEN0_THRESHOLD = 50_000  # net new container objects between young passes (CPython's default: 700)


@dataclass
class _Process:
    """The collector is one per process: how many routers hold it tuned, and the thresholds to restore
    when the last lets go (tests run several routers in one process)."""

    holders: int = 0
    saved: tuple[int, int, int] = (700, 10, 10)
    swept: bool = False  # a full collection ran before a freeze; later routers' starts sweep the young only


_PROCESS = _Process()


@dataclass
class Tuning:
    """One router's hold on the collector settings, and the router shape they were last applied for
    (`refresh` acts when it changes)."""

    enabled: bool = True
    applied: bool = False
    shape: object = None  # compared by identity: the router part whose replacement means a rebuild

    def apply(self, shape: object = None) -> None:
        """Collect, freeze what is alive, raise the young threshold (when enabled)."""
        self.shape = shape
        if not self.enabled or self.applied:
            return
        if _PROCESS.holders == 0:
            _PROCESS.saved = gc.get_threshold()
        _PROCESS.holders += 1
        self.applied = True
        # A full pass costs ~70 ms in a test process that starts hundreds of routers; the young garbage
        # of a later start is what matters there (`release` unfroze the rest, which ages normally).
        if _PROCESS.swept:
            gc.collect(1)
        else:
            gc.collect()
            _PROCESS.swept = True
        gc.freeze()
        _, gen1, gen2 = _PROCESS.saved
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)

    def refresh(self, shape: object, enabled: bool) -> bool:
        """Re-apply when the router was rebuilt (``shape`` changed) or the setting was reloaded; True if
        it acted. Unfreezing first lets the collection reclaim what the rebuild replaced."""
        if shape is self.shape and enabled == self.enabled:
            return False
        if self.applied and enabled:
            self.shape = shape
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            return True
        self.release()
        self.enabled = enabled
        self.apply(shape)
        return True

    def release(self) -> None:
        """Let go: the last router to do so unfreezes and restores the thresholds found before."""
        if not self.applied:
            return
        self.applied = False
        _PROCESS.holders -= 1
        if _PROCESS.holders == 0:
            gc.unfreeze()
            gc.set_threshold(*_PROCESS.saved)
