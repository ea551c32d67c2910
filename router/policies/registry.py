"""Policy names -> classes. The only place that knows every policy; the dispatcher and config use names.

``create_policy("cost", seed=1, prefill_s_per_token=3e-5)`` builds a policy; unknown names and unknown
parameters raise ``ValueError`` naming what is accepted, so a config typo fails at startup.
"""

from __future__ import annotations

import inspect
from typing import Any

from router.policies.base import Policy, PolicyBase
from router.policies.cache_aware import CacheAware
from router.policies.consistent_hash import ConsistentHash
from router.policies.cost import Cost
from router.policies.least_load import LeastLoad
from router.policies.power_of_two import PowerOfTwo
from router.policies.precise import Precise
from router.policies.random_choice import RandomChoice
from router.policies.round_robin import RoundRobin

_POLICIES: dict[str, type[PolicyBase]] = {
    cls.name: cls
    for cls in (RoundRobin, RandomChoice, LeastLoad, PowerOfTwo, ConsistentHash, CacheAware, Cost, Precise)
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
DEFAULT_POLICY = Cost.name


def policy_parameters(name: str) -> dict[str, Any]:
    """Constructor parameters of policy ``name`` with their defaults (for config validation and docs)."""
    cls = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_policy(name: str, **params: Any) -> Policy:
    """A new, independent instance of policy ``name`` configured with ``params``."""
    cls = _lookup(name)
    unknown = set(params) - set(policy_parameters(name))
    if unknown:
        accepted = ", ".join(sorted(policy_parameters(name)))
        raise ValueError(f"policy {name!r} has no parameter(s) {sorted(unknown)}; accepted: {accepted}")
    return cls(**params)


def _lookup(name: str) -> type[PolicyBase]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
