"""The benchmarks package's layout: the library under benchmarks/lib never imports a command module."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "benchmarks" / "lib"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "benchmarks":
                names.update(f"benchmarks.{a.name}" for a in node.names)
    return names


def test_library_modules_import_only_the_library() -> None:
    upward = {f"{p.name}: {m}" for p in LIB.glob("*.py") for m in imported_modules(p)
              if m.startswith("benchmarks") and not m.startswith("benchmarks.lib")}
    assert not upward
