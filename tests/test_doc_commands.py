"""Every command the docs quote runs as written: its flags parse (the README's set-up and "what works"
commands are how users start the router and verify a claim; a renamed flag once left one failing).

Covers ``python -m`` commands of the project's own packages (router, engine_server, benchmarks) in the
README, benchmarks/README.md and docs/, continuation lines joined. Placeholders (``N``, ``K``, ``P``,
``...``) and ``--help`` are skipped, optional ``[--flags]`` left out. Each command's ``main`` runs up
to its parsed arguments: nothing listens, loads a model or simulates."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python -m ((?:benchmarks|router|engine_server)(?:\.[a-z_]+)*)([^`|#&;)\n]*)")
PLACEHOLDER = re.compile(r"^[A-Z]+$|\.\.\.")


def _joined(text: str) -> str:
    """The doc's text with shell continuation lines joined, and inline code wrapped over lines unwrapped."""
    parts = re.sub(r"\\\n\s*", " ", text).split("```")
    for i in range(0, len(parts), 2):  # outside fenced blocks
        parts[i] = re.sub(r"`[^`]+`", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)), parts[i])
    return "```".join(parts)


def quoted_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, argv) of each distinct command the docs quote, placeholders left out."""
    seen: dict[tuple[str, str], str] = {}
    for doc in DOCS:
        for m in COMMAND.finditer(_joined(doc.read_text())):
            module, rest = m.group(1), m.group(2).strip()
            seen.setdefault((module, rest), doc.relative_to(ROOT).as_posix())
    out = []
    for (module, rest), doc in seen.items():
        try:
            argv = shlex.split(rest)
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        argv = [a for a in argv if not (a.startswith("[") and a.endswith("]"))]  # "[--flag]": optional
        if not any(PLACEHOLDER.search(a) or a in ("-h", "--help") for a in argv):
            out.append((doc, module, argv))
    return out


COMMANDS = quoted_commands()


class _Parsed(Exception):
    """Raised once a command's arguments parsed: nothing past parsing runs."""


def test_the_docs_quote_commands_of_every_package():
    modules = {m.split(".")[0] for _, m, _ in COMMANDS}
    assert modules == {"benchmarks", "router", "engine_server"}
    assert len(COMMANDS) >= 40  # the pattern still finds them


@pytest.mark.parametrize(("doc", "module", "argv"), COMMANDS, ids=[f"{m} {' '.join(a)}" for _, m, a in COMMANDS])
def test_a_quoted_command_parses(doc: str, module: str, argv: list[str], monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = getattr(importlib.import_module(module), "main", None)
    if main is None:  # a package: its __main__ calls main()
        main = importlib.import_module(f"{module}.__main__").main
    try:
        main(argv)
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{doc}: python -m {module} {' '.join(argv)} does not parse (exit {e.code})")
    pytest.fail(f"python -m {module} finished without parsing its arguments")
