"""Request body -> the token ids the engine will prefill, so the router can key a request's blocks exactly
as the engines' KV events key theirs (`router.kv_events`). Pure: no I/O after the tokenizer is loaded.

Two tokenizers, one interface (`RequestTokenizer.prompt_ids(body, kind)`):

- `SimTokens`: the `sim` backend's rule (docs/sim_engine.md): token i is ``xxh64(text[i*c:(i+1)*c], seed) %
  vocab`` and chats are rendered with its ChatML-like template, both from `kv_wire.sim_tokens`, the one
  definition the sim engine uses too (the router must not import `engine_server`);
  `tests/router/test_request_tokens.py` checks the two agree end to end.
- `HFTokens`: a Hugging Face tokenizer and chat template (`transformers`, the optional `tokenize` extra),
  loaded once from the model path or hub id, with vLLM's rules as our `vllm` backend applies them: the chat
  template with ``add_generation_prompt=True``, BOS added unless the text already starts with it.

Caching, because chat turns re-send their history:

- `SimTokens` caches a chat message's ids by its rendered piece (a chunk depends on its own characters
  only), and for completions reuses the ids of the longest recent prompt the new one extends;
- `HFTokens` renders chats message by message where the template allows it (`chat_segments`);
- `HFTokens` cuts the text at special tokens (``<|im_start|>``, ``<|im_end|>``...), which a HF tokenizer
  never merges across, and caches each piece's ids, so old turns cost a dict lookup; a new piece of a
  GPT-2-style tokenizer is encoded word by word from a cache (`bytelevel`), without the Rust call. Whether pieces
  concatenate to the full encoding is checked on a sample when the tokenizer loads; if not, pieces are off
  and only whole prompts are cached.

A body the router cannot reproduce (shapes the engine would reject) gives None: the caller then has no
exact blocks for that request and falls back to its approximate index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from kv_wire import sim_tokens
from router.features.bytelevel import ByteLevelWords
from router.features.chat_segments import SegmentedTemplate
from router.features.lru import LRU
from router.features.recent_chats import RecentChats

Kind = Literal["chat", "completion"]
_NEW_SEGMENTS = 4  # a chat's ids are looked for as a recent chat's less its last 0-3 segments
_RECENT_PLAIN = RecentChats()  # `plain_messages` of recent chats: a pure function's memo


def _extended_chat(chats: LRU, rendered: Sequence[str]) -> tuple[int, Any] | None:
    """(j, what ``chats`` keeps under ``(j, rendered[j - 1])``) for the recent chat, all but its generation
    prompt, that ``rendered`` extends by 0-3 segments (the longest), or None. Keys are (count, last
    segment); the stored segments are compared whole (pieces come from the template's caches: equal, and
    mostly identical, so the comparison is mostly identity checks)."""
    n = len(rendered)
    for j in range(n - 1, max(n - 1 - _NEW_SEGMENTS, 0), -1):
        got = chats.get_fresh((j, rendered[j - 1]))
        if got is not None and got[0] == rendered[:j]:
            return j, got
    return None


class RequestTokenizer(Protocol):
    def prompt_ids(self, body: Mapping[str, Any], kind: Kind) -> list[int] | None:
        """The ids the engine prefills for this body (the FIRST prompt of a batch), or None."""
        ...


class Segments(tuple[str, ...]):
    """A chat rendered in pieces whose concatenation is the template's text (`render`'s fast form)."""


def trie_pattern(words: list[str]) -> str:
    """A regex matching any of ``words``, longest first, with shared prefixes factored out: Python's `re`
    tries alternatives one by one at every position, so 600 special tokens (reserved ones included) as a
    flat alternation cost ~0.2 ms per 16k characters; as a trie the first character decides at once."""
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def walk(node: dict[str, Any]) -> str:
        ends = "" in node
        alts = [re.escape(ch) + walk(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if ends else body  # greedy: the longer token wins, as the tokenizer's split

    return walk(trie)


def plain_messages(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Chat messages as the engine server hands them to a template (`ChatMessage.plain`): content as one
    string (text parts joined), plus name / tool_calls / tool_call_id when set. None for a bad shape."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    found = _RECENT_PLAIN.find(messages)  # a recent chat re-sent: its plain messages, shared (read only)
    start, out = (0, []) if found is None else found
    for m in messages[start:]:
        if not isinstance(m, Mapping):
            return None
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and isinstance(p.get("text"), str) for p in content):
                return None  # non-text parts: the engine server refuses them
            content = "".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            return None
        msg: dict[str, Any] = {"role": m.get("role", "user"), "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    _RECENT_PLAIN.keep(messages, out, start)
    return out


def first_prompt(body: Mapping[str, Any]) -> str | list[int] | None:
    """A completion body's first prompt: text, or token ids as given. None for a bad shape."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        head = prompt[0]
        if isinstance(head, str):
            return head
        if isinstance(head, int) and not isinstance(head, bool):
            return prompt if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) else None
        if isinstance(head, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in head):
            return head
    return None


class _Base:
    def prompt_ids(self, body: Mapping[str, Any], kind: Kind) -> list[int] | None:
        return self.encode_rendered(self.render(body, kind))

    def render(self, body: Mapping[str, Any], kind: Kind) -> Any:
        """The prompt before encoding (the chat template applied), or None: `prompt_ids`'s first step,
        apart so that `router.kv_events.measure` can time the two."""
        if kind == "chat":
            messages = plain_messages(body)
            if messages is None:
                return None
            tools = body.get("tools")
            return self.render_chat(messages, tools if isinstance(tools, list) else None)
        return first_prompt(body)

    def encode_rendered(self, rendered: Any) -> list[int] | None:
        """`render`'s result as token ids (`prompt_ids`'s second step)."""
        if rendered is None or isinstance(rendered, list):
            return rendered
        return self.encode(rendered)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str | None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError


class SimTokens(_Base):
    """The sim engine's tokenizer and template (see the module docstring), with prefix reuse.

    Chats are encoded piece by piece (`encode_rendered`), each message's chunks cached. Completion
    prompts: recent prompts are found by their first ``probe_chars`` characters (up to ``per_probe`` of
    those are kept); of those, the longest one the new prompt starts with lends its whole chunks.
    """

    def __init__(self, chars_per_token: int = 4, vocab_size: int = sim_tokens.VOCAB_SIZE, seed: int = 0, *,
                 cache_prompts: int = 1024, probe_chars: int = 256, per_probe: int = 32) -> None:
        if chars_per_token < 1:
            raise ValueError("chars_per_token must be >= 1")
        self.c, self.vocab, self.seed = chars_per_token, vocab_size, seed
        self.probe_chars, self.per_probe = probe_chars, per_probe
        self._recent: LRU = LRU(cache_prompts)  # probe -> [(text, ids)], newest last
        self._parts: LRU = LRU(16 * cache_prompts)  # (chat piece, phase) -> ids of its whole chunks
        self._chats: LRU = LRU(cache_prompts)  # (pieces, last) -> (pieces, ids, next chunk's start, their end)
        self._rendered = RecentChats(cache_prompts)  # recent chats' message pieces

    def render_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
        return sim_tokens.render_chat(messages, tools)

    def render(self, body: Mapping[str, Any], kind: Kind) -> Any:
        """A chat as `Segments` (the template's pieces, `sim_tokens.render_parts`), else `_Base.render`."""
        if kind == "chat":
            messages = plain_messages(body)
            if messages is None:
                return None
            tools = body.get("tools")
            if tools:
                return Segments(sim_tokens.render_parts(messages, tools if isinstance(tools, list) else None))
            found = self._rendered.find(messages)  # a recent chat re-sent: only new messages are rendered
            start, parts = (0, []) if found is None else found
            tail = sim_tokens.render_parts(messages[start:])  # their pieces, then the generation prompt
            parts += tail[:-1]
            self._rendered.keep(messages, parts, start)
            return Segments([*parts, tail[-1]])
        return super().render(body, kind)

    def encode_rendered(self, rendered: Any) -> list[int] | None:
        """`Segments` -> the ids of their joined text, `sim_tokens.chunk_ids`'s exactly: the chunks wholly
        inside a piece depend only on the piece and where in it the first one starts (``phase``), so they
        are cached by (piece, phase); a chunk across two pieces is hashed from the joined text. A turn
        thus hashes its new messages only, whatever other sessions came in between; and a chat extending
        a recent one (by 0-3 messages) starts from that chat's ids after one comparison of the pieces,
        instead of a lookup per piece."""
        if not isinstance(rendered, Segments):
            return super().encode_rendered(rendered)
        c, vocab, seed, cache = self.c, self.vocab, self.seed, self._parts
        ids: list[int] = []
        text: str | None = None
        pos = start = first = 0  # next chunk's start; this piece's start; the first piece to encode
        n, chats = len(rendered), self._chats
        if (found := _extended_chat(chats, rendered)) is not None:
            first, got = found
            ids, pos, start = list(got[1]), got[2], got[3]
            if pos < start:  # its last chunk ran into the next piece, which may differ here: hash it anew
                text = "".join(rendered)
                ids.append(sim_tokens.chunk_id(text[pos : pos + c], vocab, seed))
                pos += c
        for i in range(first, n):
            part = rendered[i]
            end = start + len(part)
            if pos < end:
                phase = pos - start
                whole = (end - pos) // c
                if whole:
                    key = (part, phase)
                    got = cache.get_fresh(key)
                    if got is None:
                        got = sim_tokens.chunk_ids(part[: phase + whole * c], c, vocab, seed, phase)
                        cache.put(key, got)
                    ids.extend(got)
                    pos += whole * c
            if i == n - 2 and pos <= end:  # the chat but its generation prompt, before a chunk running into it
                if 0 < first < n - 1:  # the chat this one extends is superseded (one entry per conversation)
                    chats.pop((first, rendered[first - 1]), None)
                chats.put((n - 1, part), (rendered[: n - 1], tuple(ids), pos, end))
            if pos < end:  # a chunk running into the next pieces (or the text's short last one)
                if text is None:
                    text = "".join(rendered)
                ids.append(sim_tokens.chunk_id(text[pos : pos + c], vocab, seed))
                pos += c
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        probe = text[: self.probe_chars]
        entries: list[tuple[str, list[int]]] | None = self._recent.get_fresh(probe)
        best_text, best_ids = "", []
        for old, ids in entries or ():
            if len(old) > len(best_text) and text.startswith(old):
                best_text, best_ids = old, ids
        whole = len(best_text) // self.c
        ids = best_ids[:whole] + sim_tokens.chunk_ids(text, self.c, self.vocab, self.seed, whole * self.c)
        if entries is None:
            self._recent.put(probe, [(text, ids)])
        elif best_text != text:
            entries.append((text, ids))
            del entries[: -self.per_probe]
        return ids


class HFTokens(_Base):
    """A Hugging Face tokenizer and chat template (see the module docstring), with per-piece caching."""

    def __init__(self, tokenizer: Any, *, cache_pieces: int = 16_384) -> None:
        self.tok = tokenizer
        self.bos: str | None = getattr(tokenizer, "bos_token", None)
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        special = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
        added = getattr(tokenizer, "get_added_vocab", lambda: {})() or {}
        names = sorted(set(special) | set(added), key=len, reverse=True)
        self._vocab = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
        self._split = re.compile("(" + trie_pattern(names) + ")") if names else None
        self._pieces: LRU = LRU(cache_pieces)
        backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer under a fast one
        if backend is not None:  # ~10x less overhead per call than transformers' encode (checked below)
            self._encode_piece = lambda piece: backend.encode(piece, add_special_tokens=False).ids
        else:
            self._encode_piece = lambda piece: list(tokenizer.encode(piece, add_special_tokens=False))
        # GPT-2-style tokenizers: a piece's ids word by word from a cache (`bytelevel`), else the call above
        self._words = ByteLevelWords.for_tokenizer(backend) if backend is not None else None
        self._adds_bos = bool(self.bos_id is not None and tokenizer.encode("a", add_special_tokens=True)[:1]
                              == [self.bos_id])
        self.pieces_exact = self._split is not None and self._check_pieces()
        self._segment_ids: LRU = LRU(cache_pieces)  # a later message's rendered piece -> ids (or False)
        self._head_ids: LRU = LRU(1024)  # a chat's first message rendered -> ids (BOS as the engine adds)
        self._chat_ids: LRU = LRU(1024)  # (segments, last of them) -> (those segments, their ids)
        self.segmented = SegmentedTemplate(
            lambda messages, gen: str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=gen)))

    @classmethod
    def load(cls, model: str, **kwargs: Any) -> HFTokens:
        """From a local model directory or a hub id (needs `transformers`)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError(f"tokenizer {model!r} needs transformers: install the `tokenize` extra "
                              "(or use `sim` for sim engines)") from exc
        return cls(AutoTokenizer.from_pretrained(model), **kwargs)

    def render(self, body: Mapping[str, Any], kind: Kind) -> Any:
        """A chat as `Segments` when its template renders message by message (`chat_segments`): only
        a turn's new messages are rendered, and encoded; else as `_Base.render`."""
        if kind == "chat" and self.segmented.enabled and not body.get("tools"):
            messages = plain_messages(body)
            if messages is None:
                return None
            segments = self.segmented.segments(messages)
            if segments is not None:
                return Segments(segments)
        return super().render(body, kind)

    def encode_rendered(self, rendered: Any) -> list[int] | None:
        """`Segments` are encoded piece by piece from a cache: exact when the pieces split at special
        tokens (`pieces_exact`) and each later piece starts with one, as a message's does in ChatML-like
        templates (the text is then cut there anyway); otherwise the joined text is encoded."""
        if not isinstance(rendered, Segments):
            return super().encode_rendered(rendered)
        if not self.pieces_exact:
            return self.encode("".join(rendered))
        n, chats = len(rendered), self._chat_ids
        if (found := _extended_chat(chats, rendered)) is not None:
            start, got = found
            ids = list(got[1])
        else:
            head = rendered[0]
            got = self._head_ids.get_fresh(head)
            if got is None:
                got = self._by_pieces(head)
                self._head_ids.put(head, got)
            ids, start = list(got), 1
        cache, split = self._segment_ids, self._split
        assert split is not None
        for i in range(start, n):
            segment = rendered[i]
            got = cache.get_fresh(segment)
            if got is None:
                got = self._pieces_ids(segment) if split.match(segment) else False
                cache.put(segment, got)
            if got is False:
                return self.encode("".join(rendered))
            if i == n - 1 and n > 1:  # all but the last segment (the generation prompt): the next turn's prefix
                if 1 < start < n - 1:  # the chat this one extends is superseded (one entry per conversation)
                    chats.pop((start, rendered[start - 1]), None)
                chats.put((n - 1, rendered[n - 2]), (rendered[: n - 1], tuple(ids)))
            ids.extend(got)
        return ids

    def render_chat(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str | None:
        try:
            return str(self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                    add_generation_prompt=True))
        except Exception:  # noqa: BLE001 - no template, or it rejects the chat: the engine answers 400
            return None

    def _full(self, text: str) -> list[int]:
        bos = self.bos
        return list(self.tok.encode(text, add_special_tokens=not (bos and text.startswith(bos))))

    def _by_pieces(self, text: str) -> list[int]:
        ids = self._pieces_ids(text)
        if self._adds_bos and not (self.bos and text.startswith(self.bos)):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        return ids

    def _pieces_ids(self, text: str) -> list[int]:
        """``text``'s ids cut at special tokens, each piece's ids cached (no BOS added)."""
        assert self._split is not None
        ids: list[int] = []
        vocab, cache = self._vocab, self._pieces
        for piece in self._split.split(text):
            if not piece:
                continue
            special = vocab.get(piece)
            if special is not None:
                ids.append(special)
                continue
            got = cache.get_fresh(piece)
            if got is None:
                got = self._words.encode(piece) if self._words is not None else None
                if got is None:
                    got = self._encode_piece(piece)
                cache.put(piece, got)
            ids.extend(got)
        return ids

    def _check_pieces(self) -> bool:
        sample = [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hello there, how are you?  Fine.\n\nA list: 1, 2"},
                  {"role": "assistant", "content": " leading space and trailing "},
                  {"role": "user", "content": "ünïcode → ok"}]
        text = self.render_chat(sample, None)
        texts = [t for t in (text, "plain prompt, no template", "  two leading spaces") if t]
        return all(self._by_pieces(t) == self._full(t) for t in texts)

    def encode(self, text: str) -> list[int]:
        if self.pieces_exact:
            return self._by_pieces(text)
        got = self._pieces.get_fresh(text)
        if got is None:
            got = self._full(text)
            self._pieces.put(text, got)
        return list(got)


def load_tokenizer(spec: str, *, chars_per_token: int = 4, seed: int = 0) -> RequestTokenizer:
    """``sim`` -> `SimTokens`; anything else is a model path or hub id for `HFTokens`."""
    if spec == "sim":
        return SimTokens(chars_per_token=chars_per_token, seed=seed)
    return HFTokens.load(spec)

