"""Every benchmark command the docs quote runs as written: its flags parse (the README's "what works"
table is how users verify a claim, and a renamed flag once left one of its commands failing).
Placeholders (``N``, ``P``, ``...``) and ``--help`` are skipped; each command's ``main`` runs up to its parsed arguments."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m (benchmarks\.[a-z_]+)((?: +(?:--?[\w-]+|[\w.,:=/@%+-]+))*)")
PLACEHOLDER = re.compile(r"^[A-Z]+$|\.\.\.")


def quoted_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, argv) of each distinct benchmark command in the docs, placeholders left out."""
    seen: dict[tuple[str, str], str] = {}
    for doc in DOCS:
        for m in COMMAND.finditer(doc.read_text()):
            module, rest = m.group(1), m.group(2).strip()
            seen.setdefault((module, rest), doc.relative_to(ROOT).as_posix())
    out = []
    for (module, rest), doc in seen.items():
        argv = shlex.split(rest)
        if not any(PLACEHOLDER.search(a) or a in ("-h", "--help") for a in argv):
            out.append((doc, module, argv))
    return out


COMMANDS = quoted_commands()


def test_the_docs_quote_benchmark_commands():
    assert len(COMMANDS) >= 20  # the pattern still finds them


class _Parsed(Exception):
    """Raised once a command's arguments parsed: nothing past parsing runs."""


@pytest.mark.parametrize(("doc", "module", "argv"), COMMANDS, ids=[f"{m} {' '.join(a)}" for _, m, a in COMMANDS])
def test_a_quoted_benchmark_command_parses(doc: str, module: str, argv: list[str], monkeypatch):
    main = getattr(importlib.import_module(module), "main", None)
    if main is None:
        pytest.skip(f"{module} has no main")
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(argv)
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{doc}: python -m {module} {' '.join(argv)} does not parse (exit {e.code})")
    pytest.fail(f"python -m {module}: main() returned without parsing its arguments")
