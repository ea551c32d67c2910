"""The import graph of the project's packages: no cycles, and the package rules of docs/architecture.md.

The graph is read from the source with `ast`, not by importing: every ``import`` counts, at module level,
inside functions and under ``if TYPE_CHECKING`` alike, because a late import that dodges a cycle at run
time is still a cycle in the design. An edge goes to the most specific module imported
(``from router.policies import base`` -> ``router.policies.base``), not to every parent package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "engine_server", "config", "openai_http", "kv_wire", "benchmarks")

# The pure routing core: policies, request features and the prefix index decide on plain data, so they run
# unchanged in the live router and in the offline simulator.
PURE_CORE = ("router.policies", "router.features", "router.prefix_index", "router.replica_view")
# What the pure core must not reach, even through another module: the web framework and the serving shell.
SERVING_SHELL = ("aiohttp", "openai_http", "router.proxy", "router.dispatch", "router.app", "router.runtime",
                 "router.reload", "router.admin", "router.cli")

# (importing modules, modules they must not import, why). Prefixes match a module and its submodules.
# `transitive`: also through the project's own modules in between (third-party internals are not walked).
RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], bool, str], ...] = (
    (("router",), ("engine_server",), False,
     "the router talks to engines over HTTP only, so it runs in front of any OpenAI server"),
    (("engine_server",), ("router",), False, "an engine server knows nothing of who routes to it"),
    (("config",), ("router", "engine_server", "openai_http"), True,
     "config is the shared leaf: plain validated models both servers may import"),
    (("openai_http",), ("router", "engine_server", "config"), True,
     "the shared HTTP layer (OpenAI errors, request ids, hostile-input body reading) is a leaf both "
     "servers import"),
    (("kv_wire",), ("router", "engine_server", "config", "openai_http"), True,
     "vLLM's KV event wire format is a leaf: engines publish it, the router decodes it, one definition"),
    (PURE_CORE, SERVING_SHELL, True,
     "the routing core is pure and synchronous: no aiohttp, no proxy, no app, so the simulator runs it"),
    (("router", "engine_server", "config", "openai_http", "kv_wire"), ("benchmarks", "tests"), False,
     "shipped code never depends on the benchmarks or the tests"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


MODULES = project_modules()


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(name: str) -> Iterator[str]:
    """Every module `name` imports (project modules resolved to the most specific one; others as written)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in MODULES else target


def graph() -> dict[str, set[str]]:
    return {m: {t for t in imports_of(m) if t != m} for m in MODULES}


GRAPH = graph()


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among project modules, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(g.get(m, ())):
            if t not in g:
                continue
            if state.get(t) == 1:
                return [*path[path.index(t):], t]
            if t not in state and (found := visit(t)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def reachable(start: str) -> dict[str, str]:
    """Every module `start` reaches (through project modules), mapped to the module that imports it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        m = stack.pop()
        for t in GRAPH.get(m, ()):
            if t not in seen and t != start:
                seen[t] = m
                if t in GRAPH:
                    stack.append(t)
    return seen


def violations(importers: tuple[str, ...], forbidden: tuple[str, ...], transitive: bool) -> list[str]:
    found = []
    for m in sorted(MODULES):
        if not _under(m, importers):
            continue
        targets = reachable(m) if transitive else {t: m for t in GRAPH[m]}
        found += [f"{m} -> {t} (imported by {via})" for t, via in sorted(targets.items()) if _under(t, forbidden)]
    return found


def test_the_walk_sees_every_package() -> None:
    assert {m.split(".")[0] for m in MODULES} == set(PACKAGES)
    assert "router.policies.registry" in GRAPH["router.policies"]


def test_no_module_imports_itself_back_through_others() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH) or [])}"


def test_a_late_import_still_makes_a_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]


def test_a_late_import_is_an_import() -> None:
    assert "router.discovery.kubernetes" in GRAPH["router.discovery"]  # imported inside a function


@pytest.mark.parametrize("importers, forbidden, transitive, why", RULES,
                         ids=[f"{'+'.join(r[0][:2])}-not-{'+'.join(r[1][:2])}" for r in RULES])
def test_package_rule(importers: tuple[str, ...], forbidden: tuple[str, ...], transitive: bool,
                      why: str) -> None:
    assert violations(importers, forbidden, transitive) == [], why
