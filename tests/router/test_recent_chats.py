"""`RecentChats` and its users: a chat re-sending a recent one gets exactly what walking every message gives."""

from __future__ import annotations

import copy
import random

import pytest

from router.features import parse, tokenize
from router.features.hashing import HashingConfig
from router.features.parse import FeatureError, features_from_body
from router.features.recent_chats import RecentChats

CONTENTS = ["", "a", "ok", "→ ünï", "1", "true", "x" * 70]


def simple(rng: random.Random) -> dict:
    return {"role": rng.choice(["user", "assistant", "system"]), "content": rng.choice(CONTENTS)}


def odd(rng: random.Random) -> dict:
    """Messages that are not simple, some equal by ``==`` to others that serialize differently."""
    return rng.choice([
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "x": 1}]},
        {"role": "user", "content": [{"type": "image_url", "x": True}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": 1}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": True}]},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
        {"role": "user", "content": "n", "name": "bob"},
    ])


def sessions(seed: int, steps: int = 300) -> list[list]:
    """Interleaved growing chats: 1-3 messages added, re-sent, history edited, odd messages mixed in."""
    rng = random.Random(seed)
    chats: list[list] = [[simple(rng)] for _ in range(4)]
    out = []
    for _ in range(steps):
        s = rng.randrange(len(chats))
        msgs = chats[s]
        pick = rng.random()
        if pick < 0.15 and len(msgs) > 1:
            at = rng.randrange(len(msgs))
            msgs = [*msgs[:at], simple(rng), *msgs[at + 1 :]]
        elif pick < 0.9:
            msgs = msgs + [odd(rng) if rng.random() < 0.1 else simple(rng) for _ in range(rng.randrange(1, 4))]
        chats[s] = msgs
        out.append(copy.deepcopy(msgs))  # fresh objects, as each request's parsed JSON
    return out


def test_a_found_chat_gives_what_was_kept_for_its_prefix():
    recent = RecentChats()
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    recent.keep(chat, ["A", "B"])
    assert recent.find([*chat, {"role": "user", "content": "c"}]) == (2, ["A", "B"])
    assert recent.find([{"role": "user", "content": "z"}, chat[1]]) is None  # an edited history
    assert recent.find([*chat, *[{"role": "user", "content": "c"}] * 4]) is None  # more than 3 new


def test_chats_with_a_message_that_is_not_simple_are_not_kept():
    recent = RecentChats()
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "name": "x"}]
    recent.keep(chat, ["A", "B"])
    assert recent.find(chat) is None


@pytest.mark.parametrize("seed", range(3))
def test_parsed_chats_equal_a_walk_over_every_message(seed, monkeypatch):
    hashing = HashingConfig()
    for msgs in sessions(seed):
        body = {"model": "m", "messages": msgs}
        try:
            got = features_from_body(body, "chat", "r", hashing)
        except FeatureError as exc:
            got = exc.message
        monkeypatch.setattr(parse, "_RECENT_MESSAGES", RecentChats())  # nothing recent: every message walked
        try:
            walked = features_from_body(body, "chat", "r", hashing)
        except FeatureError as exc:
            walked = exc.message
        monkeypatch.undo()
        assert got == walked


@pytest.mark.parametrize("seed", range(3))
def test_plain_messages_equal_a_walk_over_every_message(seed, monkeypatch):
    for msgs in sessions(10 + seed):
        got = tokenize.plain_messages({"messages": msgs})
        monkeypatch.setattr(tokenize, "_RECENT_PLAIN", RecentChats())
        walked = tokenize.plain_messages({"messages": msgs})
        monkeypatch.undo()
        assert got == walked


def test_a_conversation_keeps_one_entry_as_it_grows():
    """Each turn supersedes the one it extends: memory holds live conversations, a turn adds no objects."""
    recent = RecentChats()
    chat: list[dict] = []
    for turn in range(10):
        chat = [*chat, {"role": "user", "content": f"q{turn}"}, {"role": "assistant", "content": f"a{turn}"}]
        found = recent.find(chat)
        start, texts = (0, []) if found is None else found
        recent.keep(chat, texts + [m["content"] for m in chat[start:]], start)
        assert len(recent._chats) == 1
    assert recent.find(chat) == (len(chat), [m["content"] for m in chat])
