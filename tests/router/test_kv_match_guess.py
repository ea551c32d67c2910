"""`kv_match.Guess`: the approximate index's match walked only when `blend` reads it, with the same blend."""

from __future__ import annotations

import dataclasses
import random

from policy_fixtures import features_with
from test_cost_kv_match import FakeMatch

from router.policies.kv_match import Guess, InFlightBlocks, blend
from router.prefix_index import PrefixIndex

STATUSES = ("synced", "partial", "stale", "unsynced")
NAMES = [f"r{i}" for i in range(6)]


class Counting:
    """A `PrefixIndex` that counts its walks."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index, self.walks = index, 0

    def match(self, hashes):
        self.walks += 1
        return self.index.match(hashes)

    def replicas(self):
        return self.index.replicas()


def random_case(rng: random.Random):
    features = features_with(rng.randrange(1, 12), tag=f"t{rng.randrange(3)}")
    index = PrefixIndex()
    for name in rng.sample(NAMES, rng.randrange(0, len(NAMES) + 1)):
        index.add(name, features.block_hashes[: rng.randrange(0, len(features.block_hashes) + 1)])
    followed = rng.sample(NAMES, rng.randrange(0, len(NAMES) + 1))
    held = {n: (rng.randrange(0, len(features.block_hashes) + 1), rng.choice(STATUSES)) for n in followed}
    features = dataclasses.replace(features, kv_match=FakeMatch(features, held))
    in_flight = InFlightBlocks()
    for name in rng.sample(NAMES, rng.randrange(0, 3)):
        in_flight.add(name, features.block_hashes[: rng.randrange(0, len(features.block_hashes) + 1)])
    rooms = {n: rng.choice([None, 0.0, 16.0, 1e9]) for n in NAMES}
    room = None if rng.random() < 0.3 else rooms.get
    return features, index, in_flight, room


def test_a_guess_blends_as_the_walked_match_on_random_cases():
    rng = random.Random(14)
    for _ in range(600):
        features, index, in_flight, room = random_case(rng)
        for mode in ("precise", "auto"):
            for lru in (True, False):
                walked = blend(mode, index.match(features.block_hashes), features, in_flight, room, lru)
                lazy = blend(mode, Guess(index, features.block_hashes), features, in_flight, room, lru)
                assert lazy == walked


def test_synced_replicas_with_nothing_waiting_never_walk_the_guess():
    features = features_with(8)
    index = Counting(PrefixIndex())
    index.index.add("a", features.block_hashes[:3])
    features = dataclasses.replace(features, kv_match=FakeMatch(features, {"a": (5, "synced"), "b": (0, "synced")}))
    out = blend("auto", Guess(index, features.block_hashes), features, InFlightBlocks())
    assert out == {"a": 5} and index.walks == 0


def test_a_replica_the_events_do_not_follow_is_still_read_from_the_guess():
    features = features_with(8)
    index = Counting(PrefixIndex())
    index.index.add("c", features.block_hashes[:3])
    features = dataclasses.replace(features, kv_match=FakeMatch(features, {"a": (5, "synced")}))
    out = blend("auto", Guess(index, features.block_hashes), features, InFlightBlocks())
    assert out == {"a": 5, "c": 3} and index.walks == 1
