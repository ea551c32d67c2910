"""ReplicaView: stale or missing engine reports never read as zero load."""

from router.replica_view import ReplicaView


def v(**kw):
    return ReplicaView(name="a", url="http://a", **kw)


def test_a_report_is_fresh_only_when_received_and_recent():
    assert not v(load_age_s=None).engine_fresh(5.0)
    assert v(load_age_s=1.0).engine_fresh(5.0)
    assert not v(load_age_s=6.0).engine_fresh(5.0)


def test_request_load_is_the_router_count_raised_by_a_fresh_engine_report():
    assert v(in_flight_requests=3, running=10, waiting=2, load_age_s=0.5).request_load(5.0) == 12
    assert v(in_flight_requests=3, running=1, waiting=0, load_age_s=0.5).request_load(5.0) == 3


def test_a_stale_or_missing_report_falls_back_to_the_router_count():
    assert v(in_flight_requests=3, running=0, waiting=0, load_age_s=None).request_load(5.0) == 3
    assert v(in_flight_requests=3, running=50, waiting=9, load_age_s=60.0).request_load(5.0) == 3


def test_kv_capacity_is_known_only_when_the_engine_reported_its_geometry():
    assert v(kv_blocks_total=100, block_size=16).kv_capacity_tokens() == 1600
    assert v().kv_capacity_tokens() is None
