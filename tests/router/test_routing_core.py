"""The pure routing step (router.routing) that the live dispatcher and the fleet simulator share."""

from __future__ import annotations

from policy_fixtures import request

from router.policies.base import Decision, Outcome, PolicyBase
from router.replicas.state import ReplicaState
from router.routing import LAZY_VIEWS_ABOVE, RoutingCore, failure


class Recording(PolicyBase):
    """Chooses a fixed name and records every hook call with the views it was given."""

    name = "recording"

    def __init__(self, pick: str) -> None:
        super().__init__(seed=0)
        self.pick = pick
        self.calls: list[tuple] = []

    def choose(self, features, replicas):
        self.calls.append(("choose", [(v.name, v.in_flight_requests, v.load_age_s) for v in replicas]))
        return Decision(self.pick, "fixed")

    def on_dispatch(self, features, decision):
        self.calls.append(("dispatch", decision.replica))

    def on_complete(self, features, decision, outcome):
        self.calls.append(("complete", decision.replica, outcome.ok))


def fleet(*names: str) -> list[ReplicaState]:
    return [ReplicaState.create(n, f"http://{n}") for n in names]


def test_one_request_goes_choose_dispatch_complete_and_leaves_no_count_behind() -> None:
    reps = fleet("a", "b")
    policy = Recording("b")
    core = RoutingCore(policy)
    f = request("hello world " * 40)
    route = core.choose(f, reps, now=0.0)
    assert route.replica is reps[1] and route.decision.replica == "b"
    lease = core.dispatch(route, f, now=0.0)
    assert (reps[1].in_flight_requests, reps[1].in_flight_tokens) == (1, f.token_estimate)
    core.complete(route, lease, f, Outcome(ok=True, status=200, prompt_tokens=10, cached_tokens=4), now=1.0)
    assert (reps[1].in_flight_requests, reps[1].in_flight_tokens) == (0, 0)
    assert (reps[1].prompt_tokens_total, reps[1].cached_tokens_total) == (10, 4)
    assert policy.calls == [("choose", [("a", 0, None), ("b", 0, None)]), ("dispatch", "b"),
                            ("complete", "b", True)]


def test_a_policy_naming_no_candidate_falls_back_to_the_first() -> None:
    reps = fleet("a", "b")
    route = RoutingCore(Recording("ghost")).choose(request("x"), reps, now=0.0)
    assert (route.replica.name, route.decision.reason) == ("a", "fallback")


def test_lookup_and_given_views_are_used_as_passed() -> None:
    reps = fleet("a", "b")
    policy = Recording("a")
    core = RoutingCore(policy)
    given = core.views(reps, 0.0)
    route = core.choose(request("x"), reps, views=given[1:], lookup={r.name: r for r in reps})
    assert route.replica is reps[0]
    assert policy.calls[0] == ("choose", [("b", 0, None)])


def test_the_decision_hook_sees_every_decision() -> None:
    seen: list[str] = []
    core = RoutingCore(Recording("a"), on_decision=lambda d, s: seen.append(d.reason))
    core.choose(request("x"), fleet("a"), now=0.0)
    assert seen == ["fixed"]


def test_a_replica_blamed_failure_counts_against_its_health_a_client_one_does_not() -> None:
    core = RoutingCore(Recording("a"))
    (a,) = reps = fleet("a")
    for _ in range(a.health.config.failures_to_eject):
        route = core.choose(request("x"), reps, now=0.0)
        core.complete(route, core.dispatch(route, request("x"), 0.0), request("x"), failure(499, "client_disconnect"),
                      now=0.0)
    assert a.health.state == "healthy"
    for _ in range(a.health.config.failures_to_eject):
        route = core.choose(request("x"), reps, now=0.0)
        core.complete(route, core.dispatch(route, request("x"), 0.0), request("x"), failure(0, "connect"),
                      health_failure=True, now=0.0)
    assert a.health.state == "ejected"
    assert a.in_flight_requests == 0


def test_a_failing_on_complete_still_releases_the_lease() -> None:
    class Broken(Recording):
        def on_complete(self, features, decision, outcome):
            raise RuntimeError("bug")

    reps = fleet("a")
    core = RoutingCore(Broken("a"))
    route = core.choose(request("x"), reps, now=0.0)
    lease = core.dispatch(route, request("x"), 0.0)
    core.complete(route, lease, request("x"), failure(500, "router_error"), now=0.0)
    assert lease.released and reps[0].in_flight_requests == 0


def test_in_a_large_fleet_the_chosen_replica_is_the_one_whose_view_the_policy_read() -> None:
    class ReadsOne(PolicyBase):
        name = "reads-one"

        def choose(self, features, replicas):
            return Decision(replicas[len(replicas) - 7].name, "fixed")

    reps = fleet(*(f"r{i}" for i in range(LAZY_VIEWS_ABOVE + 100)))
    route = RoutingCore(ReadsOne(seed=0)).choose(request("x"), reps, now=0.0)
    assert route.replica is reps[-7] and route.decision.reason == "fixed"
