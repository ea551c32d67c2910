"""Small builders shared by the policy tests (not a test module)."""

from __future__ import annotations

from router.features import HashingConfig, RequestFeatures, features_from_text
from router.replica_view import ReplicaView

HASHING = HashingConfig()


def request(text: str = "", *, rid: str = "r", affinity_key: str | None = None, max_tokens: int | None = 16):
    return features_from_text(text, "m", rid, HASHING, max_tokens=max_tokens, affinity_key=affinity_key)


def prompt(tag: str, blocks: int) -> str:
    """``blocks`` full 64-character blocks whose first block is unique to ``tag``."""
    return (tag * 64)[:64] + "".join(f"{tag}-{i:08d}".ljust(64, ".") for i in range(1, blocks))


def view(name: str, **kw) -> ReplicaView:
    return ReplicaView(name=name, url=f"http://{name}", **kw)


def views(*names: str, **kw) -> list[ReplicaView]:
    return [view(n, **kw) for n in names]


def features_with(blocks: int, tag: str = "p", **kw) -> RequestFeatures:
    return request(prompt(tag, blocks), **kw)
