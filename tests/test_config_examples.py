"""Every file under config/examples/ loads, and a mistake in one is reported by field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from config.router import ConfigError, load_config
from router.policies.registry import create_policy

EXAMPLES_DIR = Path(__file__).parent.parent / "config" / "examples"
EXAMPLES = sorted(p for p in EXAMPLES_DIR.rglob("*") if p.is_file())
# The env vars the examples read their keys from (documented at the top of each example).
EXAMPLE_ENV = {"ROUTER_KEY_TEAM_A": "sk-example-team-a", "ROUTER_KEY_BATCH": "sk-example-batch",
               "ROUTER_ADMIN_KEY": "sk-example-admin"}


@pytest.fixture(autouse=True)
def example_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(var, value)


def test_there_are_examples() -> None:
    assert any(p.name == "router.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_loads_and_its_policy_builds(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.replicas
    create_policy(cfg.policy.name, **cfg.policy.policy_kwargs())


def test_the_keyed_example_turns_auth_on_with_its_env_keys() -> None:
    cfg = load_config(EXAMPLES_DIR / "router-with-keys.yaml")
    assert cfg.auth.enabled
    assert {k.secret() for _, _, k in cfg.auth.named_keys()} == set(EXAMPLE_ENV.values())


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value


@pytest.mark.parametrize(("example", "dotted", "value", "why"), [
    ("router.yaml", "replicas.0.url", "localhost:8001", "http://"),
    ("router.yaml", "limits.max_in_flight", 0, "greater than or equal to 1"),
    ("router.yaml", "limits.max_inflight", 10, "Extra inputs"),
    ("router-with-keys.yaml", "auth.api_keys.1.requests_per_s", -5, "greater than 0"),
    ("router-with-keys.yaml", "auth.admin_keys.0.env", "ROUTER_UNSET_ADMIN_KEY", "ROUTER_UNSET_ADMIN_KEY is not set"),
    ("router-with-keys.yaml", "auth.admin_keys.0.file", "/nonexistent/admin-key", "cannot read key file"),
])
def test_a_bad_value_in_an_example_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example: str,
                                                   dotted: str, value: Any, why: str) -> None:
    monkeypatch.delenv("ROUTER_UNSET_ADMIN_KEY", raising=False)
    data = yaml.safe_load((EXAMPLES_DIR / example).read_text())
    _set(data, dotted, value)
    bad = tmp_path / example
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert str(exc.value).startswith(f"{dotted}:") and why in str(exc.value), str(exc.value)
