"""benchmarks.overhead --baseline-tree: our router as another checkout has it, beside the current one."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.overhead import TREE_ROUTER, contenders


def args(**over: object) -> argparse.Namespace:
    base = {"contenders": ["ours"], "our_policy": ["cost"], "peer_policy": "round_robin", "profile_router": None,
            "baseline_tree": None}
    return argparse.Namespace(**{**base, **over})


def test_without_a_baseline_tree_only_our_router_runs() -> None:
    assert [c.name for c in contenders(args())] == ["cost"]


def test_a_comma_list_of_policies_runs_one_router_per_policy_and_the_floor_when_asked() -> None:
    chosen = contenders(args(contenders=["ours", "aiohttp-floor"], our_policy=["cost", "round_robin"]))
    assert [(c.name, c.kind) for c in chosen] == [("cost", "ours"), ("round_robin", "ours"),
                                                   ("aiohttp-floor", "aiohttp-floor")]


def test_the_baseline_runs_the_same_router_and_config_from_the_other_checkout(tmp_path: Path) -> None:
    ours, base = contenders(args(baseline_tree=str(tmp_path)))
    assert (base.name, base.kind, base.policy) == ("cost@baseline", "ours", "cost")
    argv = base.argv(8000, ["http://127.0.0.1:1"], tmp_path / "work")
    assert argv[1:4] == ["-c", TREE_ROUTER, str(tmp_path.resolve())]
    mine = ours.argv(8000, ["http://127.0.0.1:1"], tmp_path / "work")
    assert argv[4] == mine[3] == "--config"
    assert Path(argv[5]).read_text() == Path(mine[4]).read_text()  # the same router config
