"""The engine server's error responses: OpenAI's format from `openai_http` (the same bodies the router
sends), plus the 400 for a request that fails the protocol models' validation."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from openai_http.errors import error_response

__all__ = ["error_response", "validation_error_response"]


def validation_error_response(exc: ValidationError) -> web.Response:
    """400 naming the first offending field, as OpenAI does (`param` is the dotted field path)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return error_response(f"{param}: {msg}" if param else msg, 400, param=param or None)
