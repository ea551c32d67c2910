"""Fixed settings every benchmark shares: where things are, what the sim serves, and `cost`'s tuning per
sim profile (one place, so every benchmark that runs a tuned `cost` runs the same one)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
MODEL = "sim-model"
HOST = "127.0.0.1"
SESSION_HEADER = "x-session-id"  # the router's default session-affinity header (config/router.py)
# Starting points for `cost` on the sim profiles, from docs/policies.md (only their ratios matter;
# the router's defaults fit H100s). Every benchmark that runs `cost` tuned to a profile uses these.
PROFILE_COST_PARAMS: dict[str, dict[str, float]] = {
    "h100-llama3-8b": {},
    "llmd-8b": {"prefill_s_per_token": 2.5e-4, "request_overhead_s": 1e-2, "decode_s_per_seq": 1e-4},
    "tiny-cpu": {"prefill_s_per_token": 1.5e-4, "request_overhead_s": 7e-3, "decode_s_per_seq": 1e-3},
}
