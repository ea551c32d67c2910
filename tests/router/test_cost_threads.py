"""cost with conversations: new ones spread over the replicas, later turns stay with their history."""

from collections import Counter

from policy_fixtures import request, views

from router.policies.base import Outcome
from router.policies.cost import Cost
from router.policies.threads import Threads

SYSTEM = "You are a helpful assistant. " + "s" * 1000  # the system prompt every conversation shares
OK = Outcome(ok=True, status=200, ttft_s=0.1, completion_tokens=16)


def turn(conversation: int, t: int) -> str:
    """Turn ``t`` of a conversation: the shared system prompt, then its own history and a new message."""
    return SYSTEM + "".join(f"[conversation {conversation} turn {k}] " + "u" * 300 + " reply " + "a" * 100
                            for k in range(t + 1))


def serve(policy: Cost, text: str, rid: str) -> str:
    """One request on an idle fleet of four (each finishes before the next arrives); its replica."""
    features = request(text, rid=rid)
    decision = policy.choose(features, views("r0", "r1", "r2", "r3"))
    policy.on_dispatch(features, decision)
    policy.on_complete(features, decision, OK)
    return decision.replica


def chat_service(policy: Cost, conversations: int) -> dict[int, list[str]]:
    """Once a first conversation has shown that prompts here have later turns (four turns), conversations
    start one by one while the earlier ones go on (each takes a turn after every start); the replicas each
    conversation's turns went to."""
    went: dict[int, list[str]] = {0: [serve(policy, turn(0, t), f"c0-{t}") for t in range(4)]}
    for c in range(1, conversations):
        went[c] = [serve(policy, turn(c, 0), f"c{c}-0")]
        for earlier in range(c):
            went[earlier].append(serve(policy, turn(earlier, len(went[earlier])), f"c{earlier}-{len(went[earlier])}"))
    return went


def test_first_turns_sharing_a_system_prompt_spread_evenly_over_the_replicas():
    went = chat_service(Cost(seed=0), 8)
    assert sorted(Counter(turns[0] for turns in went.values()).values()) == [2, 2, 2, 2]


def test_a_conversations_later_turns_stay_where_its_first_turn_went():
    went = chat_service(Cost(seed=0), 8)
    assert all(set(turns) == {turns[0]} for turns in went.values())


def test_without_later_turns_a_shared_prefix_keeps_its_holder():
    # Single-turn questions on a shared prompt (gsp): spreading would only recompute the prefix.
    policy = Cost(seed=0)
    replicas = {serve(policy, SYSTEM + f" question {q} " + "q" * 200, f"q{q}") for q in range(8)}
    assert len(replicas) == 1


def test_a_prompt_extending_an_earlier_one_moves_its_thread_instead_of_starting_one():
    threads = Threads()
    threads.dispatched("a", (1, 2, 3))
    threads.dispatched("b", (1, 2, 3, 4, 5))  # the same conversation, moved
    threads.dispatched("a", (1, 2, 9))  # another conversation on the shared (1, 2)
    assert (threads.continued((1, 2, 3, 4, 5, 6)), dict(threads.resident)) == (5, {"a": 1, "b": 1})


def test_the_oldest_threads_age_out_beyond_capacity():
    threads = Threads(capacity=2)
    for tip, replica in ((1, "a"), (2, "a"), (3, "b")):
        threads.dispatched(replica, (0, tip))
    assert (threads.continued((0, 1, 7)), +threads.resident) == (None, Counter({"a": 1, "b": 1}))
