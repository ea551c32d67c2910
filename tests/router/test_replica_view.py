"""ReplicaView: stale or missing engine reports never read as zero load."""

from router.replica_view import LazyViews, ReplicaView
from router.replicas.state import ReplicaState


def v(**kw):
    return ReplicaView(name="a", url="http://a", **kw)


def test_a_view_has_a_fresh_report_when_its_builder_kept_one():
    # ReplicaState.view decides freshness once (tests/router/test_replica_state.py); the view trusts it.
    assert not v(load_age_s=None).engine_fresh()
    assert v(load_age_s=1.0).engine_fresh()


def test_request_load_is_the_router_count_raised_by_a_fresh_engine_report():
    assert v(in_flight_requests=3, running=10, waiting=2, load_age_s=0.5).request_load() == 12
    assert v(in_flight_requests=3, running=1, waiting=0, load_age_s=0.5).request_load() == 3


def test_a_missing_report_falls_back_to_the_router_count():
    assert v(in_flight_requests=3, running=0, waiting=0, load_age_s=None).request_load() == 3


def test_kv_capacity_is_known_only_when_the_engine_reported_its_geometry():
    assert v(kv_blocks_total=100, block_size=16).kv_capacity_tokens() == 1600
    assert v().kv_capacity_tokens() is None


def test_lazy_views_build_each_view_once_and_only_when_read():
    built = []

    class Counting(ReplicaState):
        def view(self, now, stale_after_s=5.0):
            built.append(self.name)
            return super().view(now, stale_after_s)

    lazy = LazyViews([Counting(f"r{i}", f"http://r{i}") for i in range(100)], now=0.0, stale_after_s=3.0)
    assert len(lazy) == 100 and built == []
    assert lazy[7].name == "r7" and lazy[-1].name == "r99" and lazy[7] is lazy[7]
    assert built == ["r7", "r99"]
    assert [v.name for v in lazy] == [f"r{i}" for i in range(100)] and len(built) == 100


def test_lazy_views_say_where_a_view_they_built_is_and_nothing_of_the_others():
    lazy = LazyViews([ReplicaState(f"r{i}", f"http://r{i}") for i in range(100)], now=0.0, stale_after_s=3.0)
    assert lazy[42].name == "r42"
    assert lazy.index_of("r42") == 42
    assert lazy.index_of("r43") is None  # never read: the caller looks elsewhere
