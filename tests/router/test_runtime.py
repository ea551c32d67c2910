"""router.runtime: the one place a config becomes a router (start-up and reload both build from here)."""

from __future__ import annotations

import pytest

from config.router import ConfigError, RouterConfig, parse_config
from router.cli import main
from router.runtime import block_hashing, build_policy, build_replicas, dispatch_settings, new_router


def config(**over: object) -> RouterConfig:
    base: dict[str, object] = {"replicas": [{"name": "a", "url": "http://127.0.0.1:1"},
                                            {"name": "b", "url": "http://127.0.0.1:2", "weight": 2.0}]}
    return parse_config({**base, **over})


def test_a_new_router_holds_the_configs_replicas_and_hashing_and_is_not_started() -> None:
    router = new_router(config(hashing={"block_chars": 128}))
    assert router.registry.names() == ["a", "b"]
    assert router.registry.get("b").weight == 2.0
    assert router.hashing == block_hashing(router.config) and router.hashing.block_chars == 128
    assert router.dispatcher is None and router.poller is None


def test_replicas_are_built_in_the_order_asked_for() -> None:
    assert list(build_replicas(config(), ("b", "a"))) == ["b", "a"]


def test_dispatch_settings_take_the_routers_stale_after_s() -> None:
    assert dispatch_settings(config(load={"stale_after_s": 7.5})).stale_after_s == 7.5


def test_the_registry_builds_the_configured_policy() -> None:
    assert build_policy(config(policy={"name": "round_robin"})).name == "round_robin"


@pytest.mark.parametrize(("policy", "field"), [
    ({"name": "fastest"}, "policy.name"),
    ({"name": "cost", "params": {"speed": 1}}, "policy.params"),
    ({"name": "round_robin", "calibration": {"mode": "online"}}, "policy.calibration"),
])
def test_a_policy_the_registry_refuses_is_a_config_error_naming_the_field(policy: dict[str, object],
                                                                        field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        build_policy(config(policy=policy))


def test_the_cli_refuses_a_bad_policy_before_listening_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--replica", "http://127.0.0.1:1", "--policy", "fastest"]) == 2
    assert capsys.readouterr().err.startswith("error: policy.name: unknown policy 'fastest'")
