"""ReplicaView: stale or missing engine reports never read as zero load."""

from router.replica_view import ReplicaView


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
