"""Request body -> `RequestFeatures`: everything a policy may know about a request, computed once.

Policies never see the HTTP request or the JSON body; they read this frozen struct. New needs extend the
struct, never the policy signature.

Prompt text, the part that decides the prefix:

- Chat: a canonical serialization of ``tools`` (first, as chat templates put them in the system prompt)
  followed by EVERY message in order: role, optional name, content (a string, or a list of parts where
  text parts contribute their text and other parts their canonical JSON), tool calls and tool-call ids.
  It is prefix-stable across turns: when a client resends the conversation plus one more turn, the new
  text starts with the old text, so turn k+1's block chain extends turn k's. It is not the engine's chat
  template; it only has to be identical for identical prefixes.
- Completion: ``prompt`` may be a string, a list of strings (a batch), a list of token ids, or a list of
  token-id lists. A batch hashes its FIRST prompt (the batch goes to one replica, and its first prompt's
  prefix is what that replica will cache first) while the token estimate counts every prompt (load).
  Token ids are hashed as ids (see `hashing.token_block_hashes`); their estimate is exact.

Only shapes the router needs are checked; anything else is left for the engine to judge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from router.features.hashing import (
    HashingConfig,
    PrefixChains,
    RecentChains,
    block_hashes,
    token_block_hashes,
)
from router.features.recent_chats import RecentChats

if TYPE_CHECKING:
    from router.kv_events.prefix_source import RequestMatch

Kind = Literal["chat", "completion", "other"]  # other: forwarded as is (`router.features.other`)
_MAX_TOKEN_ID = 2**63 - 1
_ENDS = 4  # a chat's chain is looked up where its last 0-3 messages begin (a turn adds 1-2, a tool loop 3)
# The chains of recent chats, for the live router (the simulator passes its own `PrefixChains`): a pure
# function's memo, so sharing it between routers of one process changes nothing but time.
_RECENT = RecentChains()
_RECENT_MESSAGES = RecentChats()  # a recent chat's message texts (`recent_chats`), the same kind of memo


class FeatureError(ValueError):
    """The body has a shape the router cannot route; the app answers 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What policies know about one request.

    prompt_chars: characters of the canonical prompt text, summed over a batch (0 for token ids).
    token_estimate: prompt tokens, ``ceil(prompt_chars / chars_per_token)`` or exact for token ids.
    block_hashes: the chain from `router.features.hashing`; empty when the prompt is under one block.
    block_tokens: estimated tokens per block, to turn matched blocks into cached tokens.
    affinity_key: session header or OpenAI ``user``; only `consistent_hash` keys on it.
    """

    request_id: str
    model: str
    kind: Kind
    prompt_chars: int
    token_estimate: int
    max_tokens: int | None
    block_hashes: tuple[int, ...]
    block_chars: int
    affinity_key: str | None = None
    stream: bool = False
    block_tokens: float = 16.0
    kv_match: RequestMatch | None = None  # exact per-replica matches from KV events (lazy); None when off


def features_from_body(
    body: Any,
    kind: Kind,
    request_id: str,
    hashing: HashingConfig,
    affinity_key: str | None = None,
    prefix_chains: PrefixChains | None = None,
) -> RequestFeatures:
    """Build the features of an OpenAI ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body.

    ``affinity_key`` (e.g. a session header) wins over the body's ``user`` field. Raises `FeatureError`.
    ``prefix_chains`` (the simulator's) caches the chain of a chat's earlier messages; same result.
    """
    if not isinstance(body, dict):
        raise FeatureError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise FeatureError("'model' must be a non-empty string", "model")
    prefix_chars = 0
    ends: list[int] = []
    if kind == "chat":
        parts = _chat_parts(body.get("messages"), body.get("tools"))
        text = "".join(parts)
        prefix_chars = len(text) - len(parts[-1])
        end = len(text)
        for part in parts[: -_ENDS - 1 : -1]:
            ends.append(end)
            end -= len(part)
        prompts: list[str] | list[list[int]] = [text]
        max_tokens = _max_tokens(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _max_tokens(body, "max_tokens")
    elif kind == "completion":
        prompts = _completion_prompts(body.get("prompt"))
        max_tokens = _max_tokens(body, "max_tokens")
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise FeatureError("'stream' must be a boolean", "stream")
    if affinity_key is None:
        user = body.get("user")
        affinity_key = user if isinstance(user, str) and user else None
    return _features(prompts, model, kind, request_id, hashing, max_tokens, affinity_key, stream,
                     prefix_chains, prefix_chars, ends)


def features_from_text(
    text: str,
    model: str,
    request_id: str,
    hashing: HashingConfig,
    *,
    kind: Kind = "completion",
    max_tokens: int | None = None,
    affinity_key: str | None = None,
    stream: bool = False,
) -> RequestFeatures:
    """Features of an already-canonical prompt text (simulators, benchmarks, tests)."""
    return _features([text], model, kind, request_id, hashing, max_tokens, affinity_key, stream)


def _features(
    prompts: list[str] | list[list[int]],
    model: str,
    kind: Kind,
    request_id: str,
    hashing: HashingConfig,
    max_tokens: int | None,
    affinity_key: str | None,
    stream: bool,
    prefix_chains: PrefixChains | None = None,
    prefix_chars: int = 0,
    ends: Sequence[int] = (),
) -> RequestFeatures:
    first = prompts[0]
    if isinstance(first, str):
        chars = sum(len(p) for p in prompts)  # type: ignore[arg-type]
        if hashing.tokenizer is None:
            if prefix_chains is None and ends:  # a chat: where its earlier turns end, their chain is known
                hashes = _RECENT.block_hashes(first, hashing.block_chars, model, ends)
            elif prefix_chains is None or prefix_chars <= 0:
                hashes = block_hashes(first, hashing.block_chars, model)
            else:
                hashes = prefix_chains.block_hashes(first, prefix_chars, hashing.block_chars, model)
            tokens = math.ceil(chars / hashing.chars_per_token)
            block_tokens = hashing.block_tokens
        else:
            ids = [list(hashing.tokenizer(p)) for p in prompts]  # type: ignore[arg-type]
            hashes = token_block_hashes(ids[0], hashing.token_block_size, model)
            tokens = sum(len(i) for i in ids)
            block_tokens = float(hashing.token_block_size)
    else:
        chars = 0
        hashes = token_block_hashes(first, hashing.token_block_size, model)
        tokens = sum(len(p) for p in prompts)
        block_tokens = float(hashing.token_block_size)
    return RequestFeatures(
        request_id=request_id,
        model=model,
        kind=kind,
        prompt_chars=chars,
        token_estimate=tokens,
        max_tokens=max_tokens,
        block_hashes=hashes,
        block_chars=hashing.block_chars,
        affinity_key=affinity_key,
        stream=stream,
        block_tokens=block_tokens,
    )


def chat_prompt_text(messages: Any, tools: Any = None) -> str:
    """Canonical, prefix-stable text of a chat request (see the module docstring)."""
    return "".join(_chat_parts(messages, tools))


def _chat_parts(messages: Any, tools: Any = None) -> list[str]:
    """The canonical text in pieces: the tools' (if any), then one per message."""
    if not isinstance(messages, list) or not messages:
        raise FeatureError("'messages' must be a non-empty array", "messages")
    if tools:
        parts = ["<tools>" + _canonical_json(tools) + "\n"]
        for i, message in enumerate(messages):
            parts.append(_message_text(message, f"messages[{i}]"))
        return parts
    found = _RECENT_MESSAGES.find(messages)  # a recent chat's texts, re-sent: only new messages are walked
    start, parts = (0, []) if found is None else found
    for i in range(start, len(messages)):
        parts.append(_message_text(messages[i], f"messages[{i}]"))
    _RECENT_MESSAGES.keep(messages, parts, start)
    return parts


def _message_text(message: Any, where: str) -> str:
    if not isinstance(message, dict):
        raise FeatureError("each message must be an object", where)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise FeatureError("message 'role' must be a non-empty string", f"{where}.role")
    content = message.get("content")
    if type(content) is str and not (message.get("name") or message.get("tool_calls")
                                     or message.get("tool_call_id")):
        return f"<{role}>{content}\n"  # the common message, as the general path below renders it
    out = [f"<{role}>"]
    name = message.get("name")
    if isinstance(name, str) and name:
        out.append(f"[{name}]")
    out.append(_content_text(message.get("content"), f"{where}.content"))
    if message.get("tool_calls"):
        out.append("<tool_calls>" + _canonical_json(message["tool_calls"]))
    tool_call_id = message.get("tool_call_id")
    if isinstance(tool_call_id, str) and tool_call_id:
        out.append(f"<tool_call_id>{tool_call_id}")
    out.append("\n")
    return "".join(out)


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FeatureError("message 'content' must be a string or an array of parts", where)
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise FeatureError("each content part must be an object", f"{where}[{j}]")
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise FeatureError("a text part needs a string 'text'", f"{where}[{j}].text")
            texts.append(text)
        else:  # images, audio, ...: their canonical JSON keeps different media apart
            texts.append(_canonical_json(part))
    return "\n".join(texts)


def _canonical_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:  # not reachable from parsed JSON, but keep the 400 promise
        raise FeatureError(f"value is not JSON-serializable: {exc}") from exc


def _completion_prompts(prompt: Any) -> list[str] | list[list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise FeatureError(
            "'prompt' must be a string, an array of strings or an array of token ids", "prompt"
        )
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [_token_ids(prompt, "prompt")]
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise FeatureError("'prompt' mixes strings, token ids and arrays", "prompt")


def _token_ids(ids: Sequence[Any], where: str) -> list[int]:
    if not ids:
        raise FeatureError("a token-id prompt must not be empty", where)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _MAX_TOKEN_ID:
            raise FeatureError("token ids must be non-negative integers", where)
    return list(ids)


def _max_tokens(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FeatureError(f"'{key}' must be a positive integer", key)
    return value
