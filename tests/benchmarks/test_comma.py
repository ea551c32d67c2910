"""One parser for the benchmark commands' comma-separated values: a bad one is argparse's error naming the flag."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable

import pytest

from benchmarks import compare, matrix
from benchmarks.lib.comma import comma_list, joined, positive_int


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--seeds", type=comma_list(int), default="1,2,3")
    p.add_argument("--names", type=comma_list(choices=("gsp", "multiturn")), default="gsp")
    p.add_argument("--rates", type=comma_list(float, allow_empty=True), default="")
    p.add_argument("--counts", type=comma_list(positive_int), default="1")
    return p


def refused(parse_args: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What argparse printed on refusing ``argv``, after checking it exited with status 2."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_a_valid_list_keeps_its_order_and_duplicates() -> None:
    args = parser().parse_args(["--seeds", "3,1,3", "--names", "multiturn,gsp", "--rates", "0.5,2"])
    assert (args.seeds, args.names, args.rates) == ([3, 1, 3], ["multiturn", "gsp"], [0.5, 2.0])
    defaults = parser().parse_args([])  # argparse applies the type to string defaults
    assert (defaults.seeds, defaults.names, defaults.rates, defaults.counts) == ([1, 2, 3], ["gsp"], [], [1])


def test_spaces_and_empty_items_are_dropped() -> None:
    assert comma_list(int)(" 1, 2 ,,3, ") == [1, 2, 3]
    assert comma_list()("a , b,") == ["a", "b"]
    assert comma_list(float, allow_empty=True)(" , ") == []
    with pytest.raises(argparse.ArgumentTypeError, match="at least one"):
        comma_list(int)(",")


def test_a_bad_number_names_the_flag_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --seeds: invalid int value 'x' in '1,x'" in refused(
        parser().parse_args, ["--seeds", "1,x"], capsys)
    assert "argument --counts: expected a positive integer, got '0'" in refused(
        parser().parse_args, ["--counts", "1,0"], capsys)


def test_an_unknown_choice_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --names: unknown 'chat'; choose from gsp, multiturn" in refused(
        parser().parse_args, ["--names", "gsp,chat"], capsys)
    assert f"argument --engines: unknown 'nope'; choose from {', '.join(matrix.ENGINES)}" in refused(
        matrix.parse_args, ["--engines", "llmd-8b,nope"], capsys)


def test_compare_parses_its_lists_and_records_them_as_given() -> None:
    args = compare.parse_args(["--workloads", "gsp,multiturn", "--rates", "12,20,2.5", "--router-processes", "1,4",
                               "--engine-urls", "http://a:1/,http://b:2"])
    assert (args.workloads, args.rates, args.concurrency, args.router_processes) == (
        ["gsp", "multiturn"], [12.0, 20.0, 2.5], [16.0], [1, 4])
    assert (args.engine_urls, args.engines, args.kv_fraction, args.policies) == (
        ["http://a:1", "http://b:2"], 2, None, None)
    recorded = compare.recorded_args(args)
    assert (recorded["workloads"], recorded["rates"], recorded["concurrency"], recorded["router_processes"],
            recorded["kv_fraction"]) == ("gsp,multiturn", "12,20,2.5", "16", "1,4", "None")
    assert joined([0.5, 1.0, 3]) == "0.5,1,3"


def test_a_command_given_a_bad_value_exits_2_without_a_traceback() -> None:
    run = subprocess.run([sys.executable, "-m", "benchmarks.evict_sweep", "--seeds", "1,x"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "argument --seeds: invalid int value 'x'" in run.stderr and "Traceback" not in run.stderr
