"""The request body sent to a replica: the client's own bytes whenever the router changes nothing.

The router asks a stream for its usage (``stream_options.include_usage``) so the engine's cached-token
count reaches the policy, and hides the extra event from a client that did not ask for it. Re-encoding
the parsed body for that cost a JSON encode per request (~20 us for a short chat); instead, when the
client sent no ``stream_options`` at all (the usual case), the member is spliced in after the body's
opening brace. The bytes forwarded then parse to exactly the object re-encoding would have sent. Any
other case (the client's own ``stream_options`` without usage, a body that is not plain UTF-8 text
starting with ``{``) is re-encoded as before.
"""

from __future__ import annotations

import json
from typing import Any

USAGE_MEMBER = b'"stream_options":{"include_usage":true},'
_WHITESPACE = b" \t\r\n"  # JSON's insignificant whitespace


def upstream_payload(body: dict[str, Any], raw: bytes | None, stream: bool) -> tuple[bytes, bool]:
    """(bytes to send, whether the router added the usage request and must strip its event).

    ``body`` is ``raw`` parsed (`openai_http.body.parse_json_object`); ``raw`` None means only the
    parsed body is known, and it is encoded."""
    opts = body.get("stream_options") if stream else None
    wants_usage = not stream or (isinstance(opts, dict) and bool(opts.get("include_usage")))
    brace = _opening_brace(raw) if raw is not None else -1
    if wants_usage:  # nothing to change
        return (raw if raw is not None and brace >= 0 else _encode(body)), False
    if raw is not None and brace >= 0 and "stream_options" not in body:
        after = _skip_whitespace(raw, brace + 1)
        if raw[after:after + 1] != b"}":  # a member follows: the one spliced in takes a comma
            return b"".join((raw[:brace + 1], USAGE_MEMBER, memoryview(raw)[brace + 1:])), True
    usage = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return _encode({**body, "stream_options": usage}), True


def _opening_brace(raw: bytes) -> int:
    """Where the ``{`` opening ``raw`` is, or -1 unless ``raw`` is UTF-8 JSON text starting with one
    (json.loads also reads UTF-16/32 and a UTF-8 byte order mark, which an engine may not)."""
    if b"\x00" in raw[:4]:
        return -1
    at = _skip_whitespace(raw, 0)
    return at if raw[at:at + 1] == b"{" else -1


def _skip_whitespace(raw: bytes, at: int) -> int:
    while at < len(raw) and raw[at] in _WHITESPACE:
        at += 1
    return at


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
