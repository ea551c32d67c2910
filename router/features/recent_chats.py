"""`RecentChats`: per-message results of recent chats, for a chat that re-sends one plus 0-3 new messages.

Why: a client re-sends the whole conversation each turn, and each step that walks the messages in Python
(the canonical text in `parse`, the plain messages in `tokenize`) paid ~0.5-1 us a message (45 messages in
a 4k-token chat) for messages it had seen the turn before. Here a chat is found as a kept chat less its
last 0-3 messages and confirmed by one C-level comparison of the message dicts; the caller then works on
the new messages only and keeps the result.

Only chats of *simple* messages are kept: dicts of exactly a string ``role`` and a string ``content``. For
those, ``==`` is exact (a dict equal to one is one: no ``1 == True`` or ``1 == 1.0`` that would serialize
differently), so a stored result is the one the caller would compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from router.features.lru import LRU

NEW = 4  # looked for as a kept chat less its last 0-3 messages (a turn adds 1-2, a tool loop 3)


def _simple(m: Any) -> bool:
    return type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str


class RecentChats:
    """``find(messages)`` -> (j, the kept results of ``messages[:j]``) or None; ``keep(messages, results)``."""

    __slots__ = ("_chats",)

    def __init__(self, size: int = 1024) -> None:
        self._chats = LRU(size)  # (count, last role, last content) -> (messages, results)

    def find(self, messages: Sequence[Any]) -> tuple[int, list[Any]] | None:
        n = len(messages)
        for j in range(n, max(n - NEW, 0), -1):
            m = messages[j - 1]
            if not _simple(m):
                continue
            got = self._chats.get_fresh((j, m["role"], m["content"]))
            if got is not None and got[0] == messages[:j]:
                return j, list(got[1])
        return None

    def keep(self, messages: Sequence[Any], results: Sequence[Any], simple_upto: int = 0) -> None:
        """Keep ``results`` (one per message) if every message is simple (``messages[:simple_upto]`` are
        known to be: they were found, and the chat found is dropped: one entry per conversation, so a turn
        adds no objects for the collector and memory holds the live conversations)."""
        if not messages or len(results) != len(messages):
            return
        for i in range(simple_upto, len(messages)):
            if not _simple(messages[i]):
                return
        last = messages[-1]
        key = (len(messages), last["role"], last["content"])
        if 0 < simple_upto < len(messages):  # found as the chat before this turn: this one supersedes it
            found = messages[simple_upto - 1]
            self._chats.pop((simple_upto, found["role"], found["content"]), None)
        self._chats.put(key, (list(messages), tuple(results)))
