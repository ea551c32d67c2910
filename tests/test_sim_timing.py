"""Specification of the step-time model and its named profiles."""

from __future__ import annotations

import math

import pytest

from engine_server.sim.timing import PROFILES, TimingProfile, get_profile


def test_h100_profile_is_the_blis_fit() -> None:
    p = get_profile("h100-llama3-8b")
    expected = 5752.7e-6 + 17.25e-6 * 1000 + 6.00e-6 * 32
    assert math.isclose(p.step_time_s(1000, 32), expected, rel_tol=1e-9)


def test_llmd_profile_pays_prefill_and_decode_overheads() -> None:
    p = get_profile("llmd-8b")
    assert math.isclose(p.step_time_s(100, 0), 0.030 + 100 * 250e-6)
    assert math.isclose(p.step_time_s(0, 5), 0.012)
    assert (p.max_num_seqs, p.num_blocks) == (16, 1024)


def test_empty_step_costs_nothing() -> None:
    assert all(p.step_time_s(0, 0) == 0.0 for p in PROFILES.values())


def test_instant_profile_is_free() -> None:
    assert get_profile("instant").step_time_s(8192, 256, 1.0) == 0.0


@pytest.mark.parametrize("name", ["h100-llama3-8b", "llmd-8b", "tiny-cpu"])
def test_a_decode_step_is_shorter_than_a_prefill_step(name: str) -> None:
    p = get_profile(name)
    assert p.step_time_s(0, 1) < p.step_time_s(512, 0)


def test_kv_usage_slows_steps_when_configured() -> None:
    p = TimingProfile("t", "", step_overhead_s=0.01, kv_slowdown=0.5)
    assert math.isclose(p.step_time_s(0, 1, kv_usage=1.0), 0.015)
    assert math.isclose(p.step_time_s(0, 1, kv_usage=0.0), 0.010)


def test_every_profile_has_a_usable_engine_shape() -> None:
    assert {"h100-llama3-8b", "llmd-8b", "tiny-cpu", "instant"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.num_blocks > 0 and p.max_num_seqs > 0 and p.max_num_batched_tokens > 0
        assert p.max_model_len <= p.num_blocks * 16


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="h100-llama3-8b"):
        get_profile("a100-nonexistent")
