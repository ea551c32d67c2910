"""Workload generators: seeded, shaped as specified, and the oracle bound behaves like a prefix cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.lib import workloads as w


@pytest.mark.parametrize("name", w.NAMES)
def test_same_seed_gives_identical_workload(name: str) -> None:
    assert w.build(name, seed=3) == w.build(name, seed=3)


@pytest.mark.parametrize("name", ["gsp", "multiturn", "agentic", "prefix-sweep"])
def test_different_seeds_give_different_text(name: str) -> None:
    assert w.build(name, seed=1) != w.build(name, seed=2)


def test_text_of_has_exact_token_length() -> None:
    import random

    assert len(w.text_of(random.Random(0), 37)) == 37 * w.CHARS_PER_TOKEN


def test_gsp_has_groups_times_questions_single_request_sessions_sharing_their_system_prompt() -> None:
    wl = w.gsp(groups=3, questions=5, system_tokens=64, question_tokens=8, output_tokens=4)
    assert len(wl.sessions) == 15 and all(len(s.turns) == 1 for s in wl.sessions)
    systems: dict[str, set[str]] = {}
    for s in wl.sessions:
        systems.setdefault(s.group, set()).add(s.turns[0].messages[0]["content"])
    assert len(systems) == 3 and all(len(v) == 1 for v in systems.values())
    assert [s.group for s in wl.sessions] != sorted(s.group for s in wl.sessions)  # shuffled


def test_gsp_full_is_the_literature_shape() -> None:
    p = w.gsp(full=True).params
    assert (p["groups"], p["questions"], p["system_tokens"], p["question_tokens"], p["output_tokens"]) == \
        (64, 16, 2048, 128, 256)


def test_multiturn_turns_resend_the_whole_history() -> None:
    wl = w.multiturn(conversations=2, turns=4, system_tokens=16, first_user_tokens=32, user_tokens=8,
                     output_tokens=4)
    for s in wl.sessions:
        for prev, nxt in zip(s.turns, s.turns[1:], strict=False):
            assert nxt.messages[: len(prev.messages)] == prev.messages
            assert [m["role"] for m in nxt.messages[len(prev.messages):]] == ["assistant", "user"]
    assert wl.sessions[0].turns[0].messages[0] == wl.sessions[1].turns[0].messages[0]  # shared system prompt


def test_agentic_popularity_is_zipf_skewed() -> None:
    wl = w.agentic(sessions=300, steps=1, agents=5, prefix_tokens=8, task_tokens=4, tool_output_tokens=4)
    counts = [sum(s.group == f"agent{a}" for s in wl.sessions) for a in range(5)]
    assert counts[0] > counts[1] > counts[4]
    assert w.zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_agentic_sessions_grow_by_a_call_and_a_tool_output() -> None:
    s = w.agentic(sessions=1, steps=3).sessions[0]
    assert [len(t.messages) for t in s.turns] == [2, 4, 6]


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_prefix_sweep_shares_the_given_ratio(ratio: float) -> None:
    wl = w.prefix_sweep(ratio, requests=40, prefixes=2, prompt_tokens=200)
    by_group: dict[str, list[str]] = {}
    for s in wl.sessions:
        by_group.setdefault(s.group, []).append(s.turns[0].messages[0]["content"])
    a, b = next(v for v in by_group.values() if len(v) > 1)[:2]
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert shared // w.CHARS_PER_TOKEN == pytest.approx(200 * ratio, abs=2)
    assert w.build("prefix-sweep", ratios=(0.2, 0.4), requests=4)[1].params["ratio"] == 0.4


def test_trace_keeps_sharing_lengths_and_arrival_times(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000, "input_length": 20, "output_length": 5, "hash_ids": [1, 2, 3]},
            {"timestamp": 3000, "input_length": 17, "output_length": 7, "hash_ids": [1, 2, 9]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = w.trace(path, block_tokens=8)
    a, b = (s.turns[0] for s in wl.sessions)
    assert [s.at_s for s in wl.sessions] == [0.0, 2.0]
    assert len(a.messages[0]["content"]) == 20 * w.CHARS_PER_TOKEN and (a.max_tokens, b.max_tokens) == (5, 7)
    assert a.messages[0]["content"][:64] == b.messages[0]["content"][:64]  # two shared 8-token blocks
    assert a.messages[0]["content"][64:68] != b.messages[0]["content"][64:68]  # block 3 vs block 9


def test_trace_rejects_a_malformed_row_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": [1]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        w.trace(path)


def test_sample_trace_is_what_synth_trace_writes(tmp_path: Path) -> None:
    assert w.synth_trace(tmp_path / "s.jsonl").read_text() == w.SAMPLE_TRACE.read_text()


def test_unknown_workload_names_the_choices() -> None:
    with pytest.raises(ValueError, match="gsp, multiturn"):
        w.build("nope")


def test_oracle_counts_whole_shared_blocks_and_never_the_last_token() -> None:
    def render(messages):  # identity template: the prompt is the content
        return "".join(m["content"] for m in messages)

    prefix = "a" * 64 * 2  # two 16-token blocks
    wl = w.Workload("x", tuple(
        w.Session(str(i), (w.Request(({"role": "user", "content": prefix + c * 8},), 1),)) for i, c in
        enumerate("bc")))
    bound = w.oracle(wl, capacity_blocks=100, render=render)
    assert (bound.prompt_tokens, bound.cached_tokens, bound.unique_blocks) == (68, 32, 2)
    same = w.Workload("y", (wl.sessions[0], wl.sessions[0]))
    assert w.oracle(same, 100, render).cached_tokens == 32  # 34 tokens, full hit capped below the last


def test_oracle_with_less_capacity_hits_less() -> None:
    wl = w.gsp(groups=8, questions=4, system_tokens=256, question_tokens=16, output_tokens=4)
    full = w.oracle(wl, 10**6)
    assert w.oracle(wl, 40).hit_rate < full.hit_rate
    assert w.kv_blocks_per_replica(wl, 4) * 4 >= full.unique_blocks


@pytest.mark.parametrize("name", w.NAMES)
def test_reseed_rebuilds_the_same_shape_with_other_text(name: str) -> None:
    original = w.build(name, seed=5)[-1]
    assert w.reseed(original, 5) == original
    other = w.reseed(original, 6)
    assert other != original and other.num_requests == original.num_requests
    assert {k: v for k, v in other.params.items() if k != "seed"} == \
        {k: v for k, v in original.params.items() if k != "seed"}
