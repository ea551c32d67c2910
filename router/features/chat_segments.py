"""A chat template rendered per message, so a chat's next turn renders only its new messages.

Why: a Jinja chat template renders the whole conversation on every turn (~8 us a message: 0.27 ms for a
31-message, 4k-token chat), although clients re-send the same history each time. Most templates (ChatML,
Llama 3, ...) render each message on its own, so the text of a chat is

    head(m0) + piece(m1) + ... + piece(mn) + generation prompt

with ``head(m0)`` the render of ``[m0]`` alone and ``piece(m) = render([X, m]) - render([X])`` for a fixed
first message ``X``. Those are cached by message (role, content), so a turn renders two new messages;
and a chat that extends a recent one (by up to 3 messages) takes that chat's pieces at once, after one
C-level comparison of the messages, instead of a lookup per message (~1 us each, 45 in a 4k-token chat).
Several new messages (a chat seen the first time) are rendered in one call, ``[X, m1, Y, m2, Y, ...]``,
and cut at the known text of a marker message ``Y``.

Not every template is like that (one that looks at ``loop.last`` or at later messages, or that insists
on alternating roles from index 0), so the split is used only after it reproduced the full render on
varied sample chats when loaded, and on the first ``check_first`` real chats; any difference turns it off
for good, and each chat it cannot split exactly (other message fields, a marker inside a message, a
render error) is rendered whole. `HFTokens` uses it; ``tests/router/test_request_tokens.py`` compares
both ways on random chats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from router.features.lru import LRU

log = logging.getLogger("router.features.chat_segments")

Render = Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text; may raise

_FIRST = {"role": "system", "content": "s"}  # X: a first message the pieces are rendered after
_MARKER = {"role": "user", "content": "\x00\x01segment\x01\x00"}  # Y: cuts a batch of new messages apart
_NEW = 4  # a chat is looked for as a recent chat less its last 0-3 messages (a turn adds 1-2, a tool loop 3)

SAMPLES: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there,  how are you?"},
     {"role": "assistant", "content": " Fine.\n\nA list: 1, 2 "}, {"role": "user", "content": "ünïcode → ok"}],
    [{"role": "user", "content": "just one"}],
    [{"role": "user", "content": "no system"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}],
]


def _key(m: dict[str, Any]) -> tuple[str, str] | None:
    """A message's cache key, or None when it has more than a role and a string content."""
    if len(m) != 2:
        return None
    role, content = m.get("role"), m.get("content")
    if type(role) is not str or type(content) is not str:
        return None
    return role, content


class SegmentedTemplate:
    """``segments(messages)``: the rendered chat as [head, one piece per later message, generation
    prompt], whose concatenation is the full render; None when it cannot say (render the whole chat)."""

    def __init__(self, render: Render, *, cache_messages: int = 16_384, cache_chats: int = 1024,
                 check_first: int = 16) -> None:
        self._render = render
        self._heads = LRU(cache_messages)  # key of m0 -> head text
        self._pieces = LRU(cache_messages)  # key of m -> piece text
        self._chats = LRU(cache_chats)  # (messages, key of the last) -> (messages, [head, piece, ...])
        self._checks_left = check_first
        self.enabled = False
        try:
            self._first = render([_FIRST], False)
            self._marker = self._piece_by_difference(_MARKER)
            self._prompt = render([_FIRST], True)[len(self._first):]
            if not render([_FIRST], True).startswith(self._first) or not self._marker:
                return
            self.enabled = all(self._agrees(s) for s in SAMPLES)
        except Exception:  # noqa: BLE001 - a template that cannot render these: render whole chats
            return
        finally:
            self._heads.clear()
            self._pieces.clear()
            self._chats.clear()

    def segments(self, messages: Sequence[dict[str, Any]]) -> list[str] | None:
        if not self.enabled or not messages:
            return None
        n = len(messages)
        keys: list[tuple[str, str] | None] = [None] * n
        start, out, chats = 0, None, self._chats
        for j in range(n, max(n - _NEW, 0), -1):  # the chat as seen before less its last 0-3 messages
            key = keys[j - 1] = _key(messages[j - 1])
            if key is None:  # a message the pieces cannot key, in the new part (or no chat kept has it)
                return None
            got = chats.get_fresh((j, key))
            if got is not None and got[0] == messages[:j]:  # C compares: the same messages, so the same pieces
                start, out = j, list(got[1])
                break
        extends = start  # the kept chat this one extends (its message count), 0 for none
        try:
            if out is None:
                keys = [_key(m) for m in messages]
                if None in keys:
                    return None
                head = self._heads.get_fresh(keys[0])
                if head is None:
                    head = self._render([messages[0]], False)
                    self._heads.put(keys[0], head)
                out, start = [head], 1
            pieces = self._pieces
            missing = [i for i in range(start, n) if pieces.get_fresh(keys[i]) is None]
            if missing:
                self._fill([messages[i] for i in missing], [keys[i] for i in missing])  # type: ignore[misc]
            for key in keys[start:]:
                piece = pieces.get(key)
                if piece is None:  # pushed out by this very chat (more messages than the cache holds)
                    return None
                out.append(piece)
        except Exception:  # noqa: BLE001 - the template refuses the split form: the full render decides
            return None
        if self._checks_left > 0:
            self._checks_left -= 1
            if not self._agrees(list(messages), [*out, self._prompt]):
                log.warning("chat template does not render message by message; rendering whole chats")
                self.enabled = False
                return None
        if 0 < extends < n:  # the chat this one extends is superseded (one entry per conversation)
            chats.pop((extends, keys[extends - 1]), None)
        chats.put((n, keys[n - 1]), (list(messages), tuple(out)))
        out.append(self._prompt)
        return out

    def _fill(self, messages: list[dict[str, Any]], keys: list[tuple[str, str]]) -> None:
        """Render the pieces of ``messages``: one render for all, cut at the marker, else one by one."""
        if len(messages) > 1:
            batch = [_FIRST]
            for m in messages:
                batch += [m, _MARKER]
            text = self._render(batch, False)
            if text.startswith(self._first):
                cut = text[len(self._first):].split(self._marker)
                if len(cut) == len(messages) + 1 and cut[-1] == "":
                    for key, piece in zip(keys, cut, strict=False):
                        self._pieces.put(key, piece)
                    return
        for m, key in zip(messages, keys, strict=True):
            self._pieces.put(key, self._piece_by_difference(m))

    def _piece_by_difference(self, message: dict[str, Any]) -> str:
        text = self._render([_FIRST, message], False)
        if not text.startswith(self._first):
            raise ValueError("the first message renders differently when followed by another")
        return text[len(self._first):]

    def _agrees(self, messages: list[dict[str, Any]], segments: list[str] | None = None) -> bool:
        if segments is None:
            self._checks_left, left = 0, self._checks_left  # no recursion into the check
            self.enabled = True
            try:
                segments = self.segments(messages)
            finally:
                self._checks_left = left
        try:
            return segments is not None and "".join(segments) == self._render(messages, True)
        except Exception:  # noqa: BLE001 - the whole chat does not render: nothing to compare
            return segments is None
