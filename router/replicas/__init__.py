"""Replica membership and health: who is in the fleet, who may take traffic, how loaded each one is.

Kept apart from the policies (Envoy's split): `health` judges replicas, `state` holds them and builds the
frozen `ReplicaView`s policies read, `poller` keeps them current with background probes.
"""

from router.replicas.health import HealthConfig, HealthState, HealthTracker, HealthTransition
from router.replicas.poller import ReplicaPoller, parse_load_json, parse_vllm_metrics
from router.replicas.state import KV_USAGE_SCALE, Lease, LoadSnapshot, ReplicaRegistry, ReplicaState

__all__ = [
    "KV_USAGE_SCALE",
    "HealthConfig",
    "HealthState",
    "HealthTracker",
    "HealthTransition",
    "Lease",
    "LoadSnapshot",
    "ReplicaPoller",
    "ReplicaRegistry",
    "ReplicaState",
    "parse_load_json",
    "parse_vllm_metrics",
]
