"""The sampling profiler: samples are taken on CPU time and name the functions on the stack."""

from __future__ import annotations

import time

from benchmarks.sim_profile import sample_cpu


def burn(cpu_s: float) -> int:
    """Spin until this process has used ``cpu_s`` more CPU seconds (so samples are certain to fire)."""
    end, n = time.process_time() + cpu_s, 0
    while time.process_time() < end:
        n += inner()
    return n


def inner() -> int:
    return sum(range(200))


def test_samples_name_the_busy_functions_and_the_result_is_returned() -> None:
    result, samples = sample_cpu(burn, 0.3, interval_s=0.005)
    assert result > 0
    assert samples.total >= 10  # 0.3 CPU s at one sample per 5 ms of CPU time: ~60
    in_burn = sum(n for name, n in samples.inclusive.items() if name.endswith("test_sim_profile.py:burn"))
    assert in_burn >= samples.total - 1  # the first tick comes 5 ms into burn; one may land after it returns
    assert sum(samples.self_.values()) == samples.total
    assert "-- self %" in samples.report()


def test_the_timer_is_stopped_and_the_handler_restored() -> None:
    import signal

    before = signal.getsignal(signal.SIGPROF)
    sample_cpu(inner)
    assert signal.getsignal(signal.SIGPROF) is before
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
