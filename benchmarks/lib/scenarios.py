"""The reliability scenarios (see `benchmarks.reliability`): each starts its own `Lab`, injects its fault
and returns a `Row` with PASS/FAIL against its own criteria; `tests/reliability/` runs them smaller."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp

from benchmarks.lib.defaults import HOST, MODEL
from benchmarks.lib.fault_client import (
    HANG_GUARD_S,
    Result,
    admitted,
    chat,
    get_json,
    load_loop,
    metric_sum,
    request,
    tally,
)
from benchmarks.lib.lab import Lab, Row, usage_after, usage_before


async def kill_replica(streams: int = 100, duration_s: float = 6.0) -> Row:
    row = Row("kill_replica", f"{streams} streams, 3 replicas")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}") for i in range(3)]
        router = await lab.router(urls, policy={"name": "round_robin"})  # streams in flight on every replica
        usage_before(lab, row)
        load = asyncio.ensure_future(load_loop(router, streams, duration_s, lambda i: chat(i, 64)))
        await asyncio.sleep(duration_s / 3)
        lab.kill("e1")
        killed_at = time.monotonic()
        ejected_s = None
        while time.monotonic() - killed_at < 10:
            if not (await admitted(router))["r1"]:
                ejected_s = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        results = await load
        await lab.restart("e1")
        restarted = time.monotonic()
        while time.monotonic() - restarted < 30 and not (await admitted(router))["r1"]:
            await asyncio.sleep(0.05)
        readmitted = (await admitted(router))["r1"]
        row.recovery_s = time.monotonic() - restarted if readmitted else None
        tally(row, results)
        early = sum(r.outcome == "failed" and not r.started and not r.error_event for r in results)
        unclear = sum(r.outcome == "failed" and r.started and not r.error_event for r in results)
        row.facts.update(early=early, unclear=unclear, ejected_s=-1 if ejected_s is None else ejected_s,
                         readmitted=readmitted)
        row.notes.append(f"ejected after {ejected_s:.2f}s" if ejected_s is not None else "never ejected")
        row.notes.append(f"{early} failed before streaming, {unclear} cut without an SSE error event")
        usage_after(lab, row)
        row.passed = (row.hung == 0 and early == 0 and unclear == 0 and ejected_s is not None
                      and ejected_s <= 0.5 * 2 + 1.0 and readmitted)
    return row


async def failing_fleet(requests: int = 200, concurrency: int = 20) -> Row:
    row = Row("failing_fleet", f"{requests} requests, 3 replicas all 500")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}", profile="instant", error_rate=1.0) for i in range(3)]
        router = await lab.router(urls, health={"check_interval_s": 0.5, "failures_to_eject": 10**6},
                                  retry={"max_attempts": 3, "budget_ratio": 0.2, "budget_min_retries": 10,
                                         "budget_window_s": 600})
        usage_before(lab, row)
        results: list[Result] = []
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, s: aiohttp.ClientSession) -> None:
            async with sem:
                results.append(await request(s, router, chat(i, 4, stream=False)))

        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*[one(i, s) for i in range(requests)])
        retries = await metric_sum(router, "router_retries_total")
        attempts = requests + retries
        row.facts.update(attempts=attempts)
        tally(row, results)
        row.notes.append(f"attempts {attempts:.0f} = {attempts / requests:.2f}x requests (limit 1.2x + 10)")
        usage_after(lab, row)
        row.passed = row.hung == 0 and attempts <= 1.2 * requests + 10 and row.ok == 0
    return row


async def slow_fleet(requests: int = 20) -> Row:
    row = Row("slow_fleet", f"{requests} non-streamed, answers 1.5s > first_byte_s 0.5s")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}", profile="instant", latency_ms=1500) for i in range(2)]
        router = await lab.router(urls, timeouts={"first_byte_s": 0.5, "total_s": 20},
                                  health={"check_interval_s": 0.5, "failures_to_eject": 1})
        usage_before(lab, row)
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*[request(s, router, chat(i, 4, stream=False)) for i in range(requests)])
        tally(row, results)
        ejections = await metric_sum(router, "router_replica_ejections_total")
        row.facts.update(ejections=ejections)
        row.notes.append(f"{ejections:.0f} ejections")
        usage_after(lab, row)
        row.passed = row.ok == requests and ejections == 0
    return row


async def drops_and_hangs(streams: int = 40, duration_s: float = 5.0) -> Row:
    row = Row("drops_and_hangs", f"{streams} streams, 10% dropped, 10% hang")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}", drop_rate=0.1, hang_rate=0.1) for i in range(3)]
        router = await lab.router(urls, timeouts={"first_byte_s": 1.0, "idle_s": 2.0},
                                  health={"check_interval_s": 0.5, "failures_to_eject": 10**6})
        usage_before(lab, row)
        results = await load_loop(router, streams, duration_s, lambda i: chat(i, 32))
        tally(row, results)
        unclear = sum(r.outcome == "failed" and r.started and not r.error_event for r in results)
        row.facts.update(unclear=unclear)
        row.notes.append(f"{unclear} cut without an SSE error event")
        usage_after(lab, row)
        row.passed = row.hung == 0 and unclear == 0 and row.ok >= 0.8 * row.sent
    return row


async def reload_under_load(streams: int = 20, duration_s: float = 6.0) -> Row:
    row = Row("reload_under_load", f"{streams} streams; drain, undrain, remove, add, reload")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}") for i in range(3)]
        router = await lab.router(urls)
        usage_before(lab, row)
        load = asyncio.ensure_future(load_loop(router, streams, duration_s, lambda i: chat(i, 32)))
        steps = [("POST", "/admin/replicas/r0/drain", None), ("POST", "/admin/replicas/r0/undrain", None),
                 ("DELETE", "/admin/replicas/r2", None),
                 ("POST", "/admin/replicas", {"name": "r2b", "url": urls[2], "models": [MODEL]}),
                 ("POST", "/admin/reload", None)]
        statuses = []
        async with aiohttp.ClientSession() as s:
            for method, path, body in steps:
                await asyncio.sleep(duration_s / (len(steps) + 2))
                async with s.request(method, router + path, json=body) as r:
                    statuses.append(r.status)
        tally(row, await load)
        row.facts.update(admin_ok=all(200 <= st < 300 for st in statuses))
        row.notes.append(f"admin answers {statuses}")
        usage_after(lab, row)
        row.passed = row.failed == 0 and row.hung == 0 and all(200 <= st < 300 for st in statuses)
    return row


async def hostile_input(cases: int = 500, hypothesis_cases: int = 0) -> Row:
    from tests.hostile_input import check_answer, corpus, send_raw

    row = Row("hostile_input", f">= {cases} cases x (router, engine)")
    async with Lab() as lab:
        engine = await lab.engine("e0", profile="instant")
        router = await lab.router([engine], max_body_bytes=1 << 20, client_timeouts={"header_s": 2, "body_s": 2})
        usage_before(lab, row)
        items = corpus(min_cases=cases)
        bad: list[str] = []
        sem = asyncio.Semaphore(32)
        for target in (router, engine):
            port = int(target.rsplit(":", 1)[1])

            async def one(name: str, data: bytes, port: int = port, target: str = target) -> None:
                async with sem:
                    answer = await send_raw(port, data, wait_s=HANG_GUARD_S)
                problem = check_answer(answer)
                row.sent += 1
                if problem == "hung":
                    row.hung += 1
                elif problem:
                    row.failed += 1
                    bad.append(f"{'router' if target == router else 'engine'} {name}: {problem}")
                else:
                    row.ok += 1

            await asyncio.gather(*[one(n, d) for n, d in items])
        async with aiohttp.ClientSession() as s:
            metrics_ok = all([(await s.get(u + "/metrics")).status == 200 for u in (router, engine)])
        usage_after(lab, row)
        alive = lab.alive("router") and lab.alive("e0")
        row.facts.update(bad=len(bad), metrics_ok=metrics_ok, alive=alive, cases=len(items))
        row.notes.append(f"{len(items)} cases each; metrics {'200' if metrics_ok else 'FAILED'}; "
                         f"processes {'up' if alive else 'DOWN'}")
        row.notes += bad[:3]
        row.passed = (not bad and row.hung == 0 and metrics_ok and alive
                      and row.rss_mb[1] - row.rss_mb[0] < 200)
    return row


async def slow_clients(slow_headers: int = 500, slow_bodies: int = 500, normal: int = 50) -> Row:
    row = Row("slow_clients", f"{slow_headers} slow-header + {slow_bodies} slow-body conns, {normal} normal")
    timeout_s = 2.0
    async with Lab() as lab:
        engine = await lab.engine("e0", profile="instant")
        router = await lab.router([engine], client_timeouts={"header_s": timeout_s, "body_s": timeout_s},
                                  limits={"max_in_flight": 100})
        port = int(router.rsplit(":", 1)[1])
        usage_before(lab, row)

        async def slow(data: bytes) -> float | None:
            t0 = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                return None
            writer.write(data)
            try:
                async with asyncio.timeout(HANG_GUARD_S):
                    while await reader.read(65536):
                        pass
            except TimeoutError:
                return None
            except ConnectionError:
                pass
            finally:
                writer.close()
            return time.monotonic() - t0

        head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        body = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{\"model\":")
        slow_tasks = [asyncio.ensure_future(slow(head)) for _ in range(slow_headers)]
        slow_tasks += [asyncio.ensure_future(slow(body)) for _ in range(slow_bodies)]
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as s:
            normal_results = await asyncio.gather(*[request(s, router, chat(i, 8)) for i in range(normal)])
        cut = await asyncio.gather(*slow_tasks)
        tally(row, normal_results)
        hung_slow = sum(c is None for c in cut)
        longest = max((c for c in cut if c is not None), default=0.0)
        row.hung += hung_slow
        row.facts.update(longest_slow_s=longest)
        row.notes.append(f"slow connections cut after <= {longest:.1f}s (timeout {timeout_s:g}s)")
        usage_after(lab, row)
        row.passed = row.ok == normal and hung_slow == 0 and longest <= timeout_s + 10
    return row


async def disconnects(requests: int = 100, seed: int = 7) -> Row:
    row = Row("disconnects", f"{requests} clients leaving at random points")
    rng = random.Random(seed)
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}", latency_ms=200) for i in range(2)]
        router = await lab.router(urls)
        usage_before(lab, row)

        async def leave(i: int, s: aiohttp.ClientSession) -> None:
            with_stream = rng.random() < 0.5
            after = rng.uniform(0.01, 1.0)
            try:
                async with asyncio.timeout(after):
                    await request(s, router, chat(i, 64, stream=with_stream))
            except TimeoutError:
                pass

        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*[leave(i, s) for i in range(requests)])
        row.sent = requests
        t0 = time.monotonic()
        settled = False
        while time.monotonic() - t0 < 10:
            rows = (await get_json(router + "/admin/replicas"))["data"]
            engines = [await get_json(u + "/load") for u in urls]
            if all(r["in_flight_requests"] == 0 for r in rows) and all(e["in_flight"] == 0 for e in engines):
                settled = True
                break
            await asyncio.sleep(0.05)
        row.recovery_s = time.monotonic() - t0 if settled else None
        # Every dispatch attempt reports one outcome, 499s included (clients that left before the
        # router chose a replica have neither).
        counted = await metric_sum(router, "router_requests_total")
        dispatched = await metric_sum(router, "router_decisions_total")
        row.facts.update(settled=settled, counted=counted, dispatched=dispatched)
        row.notes.append("router and engine in-flight back to 0" if settled else "in-flight NOT back to 0")
        row.notes.append(f"{counted:.0f} outcomes for {dispatched:.0f} dispatches")
        usage_after(lab, row)
        row.ok = requests if settled else 0
        row.passed = settled and counted == dispatched
    return row


async def many_streams(streams: int = 1000) -> Row:
    row = Row("many_streams", f"{streams} concurrent streams, 1 router")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}") for i in range(4)]
        router = await lab.router(urls, limits={"max_in_flight": streams + 100})
        usage_before(lab, row)
        peak = [row.rss_mb[0]]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], lab.router_usage()[0])
                await asyncio.sleep(0.1)

        sampler = asyncio.ensure_future(sample())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            results = await asyncio.gather(*[request(s, router, chat(i, 128), guard_s=120)
                                             for i in range(streams)])
        sampler.cancel()
        tally(row, results)
        usage_after(lab, row)
        per_stream_kb = (peak[0] - row.rss_mb[0]) * 1000 / streams
        row.notes.append(f"peak RSS {peak[0]:.0f} MB, ~{per_stream_kb:.0f} kB per stream")
        row.passed = row.ok == streams
    return row


USER_KEY, ADMIN_KEY = "sk-reliab-user-6f1d", "sk-reliab-admin-93ac"


async def auth() -> Row:
    row = Row("auth", "missing/wrong/user keys x every protected path")
    async with Lab() as lab:
        engine = await lab.engine("e0", profile="instant")
        router = await lab.router([engine], log_level="debug",
                                  auth={"api_keys": [{"name": "team", "value": USER_KEY}],
                                        "admin_keys": [{"name": "ops", "value": ADMIN_KEY}]})
        usage_before(lab, row)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        checks: list[tuple[str, str, dict[str, str], Any, int]] = []
        user_paths = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                      ("GET", "/v1/nope")]
        admin_paths = [("GET", "/admin/replicas"), ("GET", "/admin/config"), ("POST", "/admin/reload"),
                       ("POST", "/admin/replicas/r0/drain"), ("DELETE", "/admin/replicas/r9"),
                       ("POST", "/admin/replicas"), ("GET", "/admin")]
        for method, path in user_paths + admin_paths:
            checks.append((method, path, {}, None, 401))
            checks.append((method, path, {"Authorization": "Bearer sk-wrong"}, None, 401))
        for method, path in admin_paths:
            checks.append((method, path, {"Authorization": f"Bearer {USER_KEY}"}, None, 403))
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        checks += [
            ("POST", "/admin/replicas", {**admin, "Content-Type": "text/plain"}, '{"name":"x","url":"http://h"}', 415),
            ("POST", "/admin/replicas/r0/drain", {**admin, "Origin": "http://evil.example"}, None, 403),
            ("POST", "/v1/completions", {"Authorization": f"Bearer {USER_KEY}"}, body, 200),
            ("GET", "/admin/replicas", admin, None, 200),
        ]
        wrong: list[str] = []
        async with aiohttp.ClientSession() as s:
            for method, path, headers, data, want in checks:
                kw = {"json": data} if isinstance(data, dict) else {"data": data}
                async with s.request(method, router + path, headers=headers, **kw) as r:
                    text = await r.text()
                    row.sent += 1
                    ok = r.status == want and (want < 400 or '"error"' in text)
                    row.ok += ok
                    if not ok:
                        row.failed += 1
                        wrong.append(f"{method} {path} -> {r.status} (want {want})")
            metrics = await (await s.get(router + "/metrics")).text()
        log = (lab.dir / "router.log").read_text(errors="replace")
        leaked = [k for k in (USER_KEY, ADMIN_KEY, "sk-wrong") if k in log or k in metrics]
        row.facts.update(wrong=len(wrong), leaked=len(leaked))
        row.notes += wrong[:3] + [f"keys in logs/metrics: {leaked or 'none'}"]
        usage_after(lab, row)
        row.passed = not wrong and not leaked
    return row


async def soak(minutes: float = 10.0, period_s: float = 30.0, streams: int = 30) -> Row:
    """Kill and restart a replica every `period_s` for `minutes`: the availability figure."""
    row = Row("soak", f"{minutes:g} min, {streams} streams, a replica killed+restarted every {period_s:g}s")
    async with Lab() as lab:
        urls = [await lab.engine(f"e{i}") for i in range(3)]
        router = await lab.router(urls)
        usage_before(lab, row)
        duration = minutes * 60
        load = asyncio.ensure_future(load_loop(router, streams, duration, lambda i: chat(i, 32)))
        t0, k = time.monotonic(), 0
        while time.monotonic() - t0 < duration - period_s:
            await asyncio.sleep(period_s / 2)
            victim = f"e{k % 3}"
            lab.kill(victim)
            await asyncio.sleep(period_s / 2)
            await lab.restart(victim)
            k += 1
        results = await load
        tally(row, results)
        mid_stream = sum(r.outcome == "failed" and r.started for r in results)
        eligible = row.sent - mid_stream
        share = (eligible - (row.failed - mid_stream) - row.hung) / eligible if eligible else 0.0
        row.facts.update(availability=share, kills=k)
        row.notes.append(f"{k} kills; success {share:.4%} of requests not streaming when their replica died "
                         f"(goal 99.9%); {mid_stream} cut mid-stream")
        usage_after(lab, row)
        row.passed = row.hung == 0 and share >= 0.999
    return row
