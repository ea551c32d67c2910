"""Routing policies: pure, synchronous classes that pick a replica for a request.

See `router.policies.base` for the contract and docs/policies.md for each algorithm.
"""

from router.policies.base import Decision, Outcome, Policy, PolicyBase
from router.policies.registry import DEFAULT_POLICY, POLICY_NAMES, create_policy, policy_parameters

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "Decision",
    "Outcome",
    "Policy",
    "PolicyBase",
    "create_policy",
    "policy_parameters",
]
