"""cost's flattened pricing loop (`Cost._price`, issue 12) gives the same bits as the formula written out
term by term, as it was before the loop was flattened: decisions are what users pay for, so a faster
loop must not move a last bit. The reference below is that earlier code (kept here, deliberately, as the
specification), run on a copy of the same policy over random replica states."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace

from policy_fixtures import features_with, view

from router.policies.base import Outcome
from router.policies.cost import Cost


def reference_cost(p: Cost, v, uncached: float, block_tokens: float, decode_steps: float) -> float:
    """The per-replica `_cost` and `_kv_wait` of before the flattening (with `_pending`, `_reported_running`
    and `_report_since`)."""
    p._sync_capacity(v, block_tokens)
    p._views[v.name] = v
    fresh = v.load_age_s is not None
    pending_tokens, pending_requests = p._pending(v, fresh, uncached)
    in_flight = v.in_flight_requests * p._own_scale
    running = in_flight - pending_requests
    if fresh and v.running > running:
        running = max(running, p._reported_running(v))
    consts = p._constants.get(v.name)
    if consts is None:
        consts = p._constants[v.name] = p._effective(v.name)
    overhead, per_token, per_seq, _, raw = consts
    seconds = overhead * pending_requests + per_token * pending_tokens
    limit = v.max_num_seqs
    if limit and in_flight >= limit:
        ahead = float(in_flight - limit)
        if fresh:  # the report's waiting less those admitted since to slots our finished requests freed
            promoted = v.waiting - v.finished_since_report * p._own_scale if v.running >= limit else v.waiting
            ahead = max(ahead, float(promoted))
        busy = float(limit)
        step, per = p._shared_step(v.name, raw)
        seconds += (ahead + 1.0) * (decode_steps - 1.0) * (step + per * busy) / (busy + 1.0)
    if fresh and v.running > 0 and v.kv_blocks_used > 0 and v.block_size > 0:
        r, used = float(v.running), float(v.kv_blocks_used)
        since = p._report_since(v)
        per_prompt = p._uncached_per_prompt(v.name, uncached)
        ahead = max(float(v.waiting) * per_prompt + since.sent_tokens * p._own_scale, (in_flight - r) * per_prompt)
        freed = used / r * min(float(since.finished), r)
        missing = (uncached + ahead) * p._engine_per_estimate / v.block_size - (v.kv_blocks_total - used + freed)
        if missing > 0:
            step, per = p._shared_step(v.name, raw)
            seconds += missing / used * r / (r + 1.0) * ((decode_steps - 1.0) * (step + per * r))
    own = overhead + per_token * uncached
    if running > 0:
        step, per = p._shared_step(v.name, raw)
        own += per_seq * running * decode_steps + step + per * running
    seconds += (1.0 + p.work_weight) * own
    if p.eviction_weight and uncached > 0:
        new_blocks = uncached / block_tokens
        overflow = p.index.size(v.name) + new_blocks - p.index.capacity(v.name)
        if overflow > 0:
            evicted_tokens = min(overflow, new_blocks) * block_tokens
            seconds += p.eviction_weight * per_token * evicted_tokens
    return seconds / v.weight if v.weight > 0 else seconds


def random_view(rng: random.Random, name: str):
    fresh = rng.random() < 0.7
    running = rng.choice([0, 1, 3, 8, 16])
    total = rng.choice([0, 64, 400])
    return view(name, weight=rng.choice([1.0, 0.5, 2.0]), in_flight_requests=rng.randint(0, 20),
                in_flight_tokens=rng.choice([0, 0, 300, 5000]), running=running if fresh else 0,
                waiting=rng.choice([0, 0, 2, 9]) if fresh else 0,
                kv_blocks_used=rng.randint(0, total) if fresh else 0, kv_blocks_total=total,
                block_size=16 if total else 0, load_age_s=rng.uniform(0.0, 1.0) if fresh else None,
                max_num_seqs=rng.choice([0, 0, 4, 16]), finished_since_report=rng.randint(0, running) if fresh else 0)


def test_the_flattened_loop_prices_every_replica_state_to_the_same_bits_as_the_formula():
    rng = random.Random(12)
    names = [f"r{i}" for i in range(8)]
    for trial in range(60):
        policy = Cost(seed=trial, router_processes=rng.choice([1, 1, 3]), calibration=rng.choice(
            ["relative", "online", "pinned"]), eviction_weight=rng.choice([0.0, 1.0]))
        for n in names:  # some history: in-flight sums, reports seen, calibration, a small index to evict from
            policy.index.set_capacity(n, rng.choice([8, 1 << 20]))
        seen = [random_view(rng, n) for n in names]  # reports that last a while: requests finish under them
        flying: list = []
        for i in range(rng.randint(0, 40)):
            if rng.random() < 0.2:
                at = rng.randrange(len(names))
                seen[at] = random_view(rng, names[at])
            f = features_with(rng.randint(1, 30), f"t{trial}-{rng.randint(0, 5)}", rid=f"q{i}")
            decision = policy.choose(f, seen)
            policy.on_dispatch(f, decision)
            flying.append((f, decision))
            if rng.random() < 0.6:  # an earlier request finishes, maybe under a later report
                f, decision = flying.pop(rng.randrange(len(flying)))
                ttft = rng.uniform(0.01, 0.3)
                policy.on_complete(f, decision, Outcome(
                    ok=True, status=200, ttft_s=ttft, e2e_s=ttft + rng.uniform(0.01, 1.0),
                    prompt_tokens=f.token_estimate, cached_tokens=rng.randint(0, f.token_estimate),
                    completion_tokens=rng.randint(1, 200)))
        views = [v if rng.random() < 0.5 else random_view(rng, v.name) for v in seen]
        later = [v if v.load_age_s is None else replace(v, load_age_s=v.load_age_s + 0.1) for v in views]
        matched = {n: rng.randint(0, 12) for n in names if rng.random() < 0.5}
        tokens, block_tokens = float(rng.randint(1, 400)), 16.0
        decode_steps = 1.0 + rng.choice([1.0, 32.0, 128.0])
        expected = copy.deepcopy(policy)
        for priced in (views, later):  # the same reports seen again, older: their records are kept
            want = {v.name: reference_cost(expected, v, tokens - min(matched.get(v.name, 0) * block_tokens, tokens),
                                           block_tokens, decode_steps) for v in priced}
            got = policy._price(priced, matched, tokens, block_tokens, decode_steps)
            assert got == want and all(math.isfinite(c) for c in got.values())
            # the side effects too: the reports' traffic records and the views kept for dispatch
            assert {n: (s.key, s.age, s.sent_tokens, s.finished)
                    for n, s in policy._since.items()} == \
                   {n: (s.key, s.age, s.sent_tokens, s.finished)
                    for n, s in expected._since.items()}
            assert policy._views == expected._views
