"""Reliability scenarios: a real router process in front of sim engine processes on loopback, with faults.

    python -m benchmarks.reliability                  # every scenario, default sizes (~2-3 min)
    python -m benchmarks.reliability --quick          # smaller loads (~1 min)
    python -m benchmarks.reliability --only kill_replica hostile_input

Prints one row per scenario: load held, requests sent / succeeded / failed / hung, recovery time, the
router's RSS and open fds before and after, and PASS/FAIL against the scenario's own criteria:

- kill_replica: SIGKILL one of 3 replicas under concurrent streams. Requests that had not started
  streaming must succeed (retried), streams in flight end with an SSE error event, nobody hangs; the
  replica is ejected within one health interval (+ the failed checks it takes) and readmitted after it
  comes back (recovery = restart to readmission).
- failing_fleet: every replica answers 500. Total attempts (requests + router retries) <= 1.2 x requests
  + the budget's floor, answers come back promptly.
- slow_fleet: non-streamed answers slower than first_byte_s: all succeed, no replica ejected.
- drops_and_hangs: replicas drop 10 % of streams mid-way and hang on 10 %: bounded impact, nobody hangs.
- reload_under_load: drain, undrain, remove, add, reload while streams flow: zero failed requests.
- hostile_input: >= 500 hostile requests (`tests/hostile_input.corpus`) at router AND engine: zero 5xx,
  every error in OpenAI format, both processes up, /metrics 200, router RSS growth bounded.
- slow_clients: slow-header and slow-body connections while normal traffic flows: normal requests all
  succeed, slow ones are cut after the configured timeouts.
- disconnects: clients leave at seeded random points (queued, prefill, mid-stream, non-stream): the
  router's in-flight counts and the engines' return to zero.
- many_streams: N concurrent streams through one router: all complete; RSS per stream reported.
- auth: missing, wrong and user-instead-of-admin keys on every protected path, admin JSON and Origin
  checks; no key ever in the router's log (at debug level) or metrics.
- soak (only with --only soak): 10 minutes of streams with a replica SIGKILLed and restarted every
  30 s; the share of requests that succeed, counting only those not yet streaming when their replica
  died (goal >= 99.9 %).

The same scenario functions run (smaller) in `tests/reliability/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from benchmarks.lib.lab import HEADERS, Row
from benchmarks.lib.report import format_table
from benchmarks.lib.scenarios import (
    auth,
    disconnects,
    drops_and_hangs,
    failing_fleet,
    hostile_input,
    kill_replica,
    many_streams,
    reload_under_load,
    slow_clients,
    slow_fleet,
    soak,
)

SCENARIOS: dict[str, Callable[[bool], Awaitable[Row]]] = {
    "kill_replica": lambda quick: kill_replica(40 if quick else 100),
    "failing_fleet": lambda quick: failing_fleet(100 if quick else 200),
    "slow_fleet": lambda quick: slow_fleet(10 if quick else 20),
    "drops_and_hangs": lambda quick: drops_and_hangs(20 if quick else 40),
    "reload_under_load": lambda quick: reload_under_load(10 if quick else 20),
    "hostile_input": lambda quick: hostile_input(500),
    "slow_clients": lambda quick: slow_clients(*((100, 100, 20) if quick else (500, 500, 50))),
    "disconnects": lambda quick: disconnects(50 if quick else 100),
    "many_streams": lambda quick: many_streams(300 if quick else 1000),
    "auth": lambda quick: auth(),
}
OPT_IN = {"soak": lambda quick: soak(1.0 if quick else 10.0)}  # --only soak (not in the default run)


async def run(names: Sequence[str], quick: bool) -> list[Row]:
    rows = []
    for name in names:
        t0 = time.monotonic()
        try:
            row = await {**SCENARIOS, **OPT_IN}[name](quick)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            row = Row(name, "-", notes=[f"crashed: {exc!r}"[:300]])
        row.notes.append(f"{time.monotonic() - t0:.0f}s")
        print(json.dumps({"scenario": name, "passed": row.passed}), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller loads (about a minute)")
    p.add_argument("--only", nargs="+", choices=[*SCENARIOS, *OPT_IN],
                   help="run only these scenarios (soak, 10 min with a replica killed every 30 s, only so)")
    args = p.parse_args(argv)
    rows = asyncio.run(run(args.only or list(SCENARIOS), args.quick))
    print(format_table(HEADERS, [r.cells() for r in rows]))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
