"""PrefixIndex: per-replica bounded LRUs of block hashes, matched as contiguous prefixes."""

import doctest
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import router.prefix_index
from router.prefix_index import PrefixIndex


def test_the_worked_example_in_the_module_docstring_holds():
    # Mirrors the docstring step by step, so the documentation cannot drift from the behaviour.
    index = PrefixIndex(default_capacity=4)
    index.add("a", (1, 2, 3))
    index.add("b", (1, 2, 9))
    assert index.match((1, 2, 3, 4)) == {"a": 3, "b": 2}
    assert index.match((7, 1, 2)) == {}
    index.add("a", (5, 6))
    assert index.blocks("a") == [2, 1, 6, 5]
    assert index.match((1, 2, 3)) == {"a": 2, "b": 2}
    assert doctest.testmod(router.prefix_index).failed == 0


def test_match_counts_only_blocks_contiguous_from_the_start():
    index = PrefixIndex()
    index.add("a", (1, 2, 3, 4))
    index.discard("a", (3,))
    assert index.match((1, 2, 3, 4)) == {"a": 2}


def test_match_does_not_refresh_recency():
    index = PrefixIndex(default_capacity=2)
    index.add("a", (1,))
    index.add("a", (2,))
    index.match((1,))
    index.add("a", (3,))
    assert index.match((1,)) == {}  # 1 was still the least recently *added*


def test_adding_a_known_chain_refreshes_it():
    index = PrefixIndex(default_capacity=2)
    index.add("a", (1,))
    index.add("a", (2,))
    index.add("a", (1,))
    index.add("a", (3,))
    assert index.holders(1) == {"a"} and index.holders(2) == set()


def test_a_chain_longer_than_the_capacity_keeps_its_first_blocks():
    index = PrefixIndex(default_capacity=3)
    index.add("a", tuple(range(10)))
    assert index.match(tuple(range(10))) == {"a": 3}


def test_shrinking_capacity_evicts_at_once_and_deepest_first():
    index = PrefixIndex()
    index.add("a", (1, 2, 3, 4))
    index.set_capacity("a", 2)
    assert index.capacity("a") == 2 and index.match((1, 2, 3, 4)) == {"a": 2}


def test_headroom_is_capacity_minus_blocks_held():
    index = PrefixIndex(default_capacity=10)
    assert index.headroom("never-seen") == 10
    index.add("a", (1, 2, 3))
    index.set_capacity("a", 5)
    assert index.headroom("a") == 5 - 3 == index.capacity("a") - index.size("a")


def test_remove_replica_forgets_it_and_frees_its_slot():
    index = PrefixIndex()
    index.add("a", (1, 2))
    index.add("b", (1, 2))
    index.remove_replica("a")
    assert index.match((1, 2)) == {"b": 2} and index.replicas() == ["b"]
    index.add("c", (5,))
    assert index.match((5,)) == {"c": 1} and index.match((1,)) == {"b": 1}


def test_size_counts_blocks_per_replica_and_distinct_blocks_overall():
    index = PrefixIndex()
    index.add("a", (1, 2))
    index.add("b", (2, 3))
    assert (index.size("a"), index.size("b"), index.size(), index.size("zz")) == (2, 2, 3, 0)


def test_negative_capacities_are_rejected():
    with pytest.raises(ValueError):
        PrefixIndex(default_capacity=-1)
    with pytest.raises(ValueError):
        PrefixIndex().set_capacity("a", -1)


# -- properties against a straightforward model ----------------------------------------------------

REPLICAS = ["r0", "r1", "r2"]
chains = st.lists(st.integers(0, 12), min_size=0, max_size=8)


class IndexModel(RuleBasedStateMachine):
    """The fast index must agree with one OrderedDict per replica and a naive prefix walk."""

    def __init__(self) -> None:
        super().__init__()
        self.index = PrefixIndex(default_capacity=5)
        self.model: dict[str, OrderedDict[int, None]] = {}
        self.capacity: dict[str, int] = {}

    def _lru(self, r: str) -> OrderedDict[int, None]:
        return self.model.setdefault(r, OrderedDict())

    def _evict(self, r: str) -> None:
        lru = self._lru(r)
        while len(lru) > self.capacity.get(r, 5):
            lru.popitem(last=False)

    @rule(r=st.sampled_from(REPLICAS), chain=chains)
    def add(self, r, chain):
        self.index.add(r, chain)
        lru = self._lru(r)
        for h in reversed(chain[: self.capacity.get(r, 5)]):
            lru[h] = None
            lru.move_to_end(h)
        self._evict(r)

    @rule(r=st.sampled_from(REPLICAS), cap=st.integers(0, 6))
    def resize(self, r, cap):
        self.index.set_capacity(r, cap)
        self.capacity[r] = cap
        self._evict(r)

    @rule(r=st.sampled_from(REPLICAS))
    def remove(self, r):
        self.index.remove_replica(r)
        self.model.pop(r, None)
        self.capacity.pop(r, None)

    @rule(r=st.sampled_from(REPLICAS), chain=chains)
    def discard(self, r, chain):
        self.index.discard(r, chain)
        for h in chain:
            self.model.get(r, {}).pop(h, None)

    @rule(chain=chains)
    def match_is_the_contiguous_prefix_each_replica_holds(self, chain):
        expected = {}
        for r, lru in self.model.items():
            n = 0
            while n < len(chain) and chain[n] in lru:
                n += 1
            if n:
                expected[r] = n
        assert self.index.match(chain) == expected

    @invariant()
    def capacity_is_never_exceeded_and_lru_order_matches(self):
        for r, lru in self.model.items():
            assert self.index.size(r) == len(lru) <= self.capacity.get(r, 5)
            assert self.index.blocks(r) == list(lru)

    @invariant()
    def removed_replicas_leave_no_trace(self):
        holders = set()
        for block in range(13):
            holders |= self.index.holders(block)
        assert holders <= set(self.model)
        assert self.index.size() == len(set().union(*self.model.values()) if self.model else set())


TestIndexAgainstModel = IndexModel.TestCase
TestIndexAgainstModel.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.integers(1, 10))
def test_lru_evicts_the_least_recently_used_single_blocks(blocks, capacity):
    index = PrefixIndex(default_capacity=capacity)
    for b in blocks:
        index.add("a", (b,))
    recent = list(OrderedDict.fromkeys(reversed(blocks)))[:capacity]
    assert set(index.blocks("a")) == set(recent)


def test_match_masks_group_the_holders_by_depth_deepest_first():
    index = PrefixIndex()
    index.add("a", (1, 2, 3))
    index.add("b", (1, 2, 9))
    index.add("c", (1, 2, 3))
    groups = index.match_masks((1, 2, 3, 4))
    assert [(depth, sorted(index.names(mask))) for depth, mask in groups] == [(3, ["a", "c"]), (2, ["b"])]
    assert index.match_masks((7, 1)) == [] and index.match_masks(()) == []


def test_match_masks_say_what_match_says():
    index = PrefixIndex()
    for i, chain in enumerate([(1,), (1, 2), (1, 2, 3), (1, 5), (1, 2, 3, 4)]):
        index.add(f"r{i}", chain)
    hashes = (1, 2, 3, 4, 6)
    by_masks = {name: depth for depth, mask in index.match_masks(hashes) for name in index.names(mask)}
    assert by_masks == index.match(hashes)


def test_a_replicas_bit_is_its_place_in_the_masks_and_zero_when_unknown():
    index = PrefixIndex()
    index.add("a", (1,))
    index.add("b", (1, 2))
    assert index.bit("unknown") == 0
    assert index.match_masks((1, 2)) == [(2, index.bit("b")), (1, index.bit("a"))]
    index.remove_replica("b")
    assert index.bit("b") == 0 and index.names(index.bit("a")) == ["a"]


def _state(index: PrefixIndex) -> tuple:
    return (tuple((name, index.blocks(name)) for name in index.replicas()), index.match((1, 2, 3, 4, 5, 6)),
            index.size())


@pytest.mark.parametrize("held", [0, 1, 2, 3, 5, 9])
def test_add_told_how_much_is_held_ends_as_add_alone_right_or_wrong(held):
    # `held` is the decision's match: a hint that skips lookups, never a change in what the index holds
    told, plain = PrefixIndex(default_capacity=6), PrefixIndex(default_capacity=6)
    for index in (told, plain):
        index.add("a", (1, 2, 3))
        index.add("a", (7, 8))
        index.discard("a", (2,))  # "a" holds 1 and 3 of the chain below, not 2
    told.add("a", (1, 2, 3, 4, 5), held=held)
    plain.add("a", (1, 2, 3, 4, 5))
    assert _state(told) == _state(plain)


@given(st.lists(st.tuples(st.sampled_from("ab"), st.lists(st.integers(0, 5), max_size=6), st.integers(0, 7)),
                max_size=30))
@settings(max_examples=200, deadline=None)
def test_add_with_any_held_hint_equals_add_without(ops):
    told, plain = PrefixIndex(default_capacity=5), PrefixIndex(default_capacity=5)
    for replica, chain, held in ops:
        told.add(replica, tuple(chain), held=held)
        plain.add(replica, tuple(chain))
        assert _state(told) == _state(plain)


def test_the_owner_map_is_split_so_no_single_dict_grows_with_the_whole_index() -> None:
    # A dict resize copies every entry at once (17-85 ms at 350k); each shard holds about 1/OWNER_SHARDS.
    from router.features.hashing import block_hashes
    from router.prefix_index import OWNER_SHARDS

    index = PrefixIndex()
    for i in range(200):
        index.add(f"r{i % 4}", block_hashes(f"prompt {i} " * 400, 64, "m"))
    total = index.size()
    assert total > 10_000
    assert max(map(len, index._owners)) < 2 * total / OWNER_SHARDS
