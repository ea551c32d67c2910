"""Small builders shared by the policy tests (not a test module)."""

from __future__ import annotations

import dataclasses

from router.features import HashingConfig, RequestFeatures, features_from_text
from router.replica_view import ReplicaView
from router.replicas.state import LoadSnapshot, ReplicaState

HASHING = HashingConfig()


def request(text: str = "", *, rid: str = "r", affinity_key: str | None = None, max_tokens: int | None = 16):
    return features_from_text(text, "m", rid, HASHING, max_tokens=max_tokens, affinity_key=affinity_key)


def prompt(tag: str, blocks: int) -> str:
    """``blocks`` full 64-character blocks whose first block is unique to ``tag``."""
    return (tag * 64)[:64] + "".join(f"{tag}-{i:08d}".ljust(64, ".") for i in range(1, blocks))


def view(name: str, **kw) -> ReplicaView:
    return ReplicaView(name=name, url=f"http://{name}", **kw)


def reported(name: str, *, running: int, waiting: int, report_age_s: float, **kw) -> ReplicaView:
    """A replica whose engine reported ``running``/``waiting`` ``report_age_s`` ago, as the policy gets it:
    through `ReplicaState.view`, which decides freshness (with the router's default stale_after_s)."""
    state = ReplicaState.create(name, f"http://{name}")
    state.load = LoadSnapshot(running=running, waiting=waiting, kv_blocks_used=0, kv_blocks_total=0, block_size=0,
                              prefix_cache_queries=0, prefix_cache_hits=0, received_at=0.0)
    return dataclasses.replace(state.view(now=report_age_s), **kw)


def views(*names: str, **kw) -> list[ReplicaView]:
    return [view(n, **kw) for n in names]


def features_with(blocks: int, tag: str = "p", **kw) -> RequestFeatures:
    return request(prompt(tag, blocks), **kw)
