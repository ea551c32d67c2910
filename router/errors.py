"""The router's error responses: OpenAI's format, from `openai_http` (the same bodies the engine server
sends), imported here so the router's modules name one place."""

from __future__ import annotations

from openai_http.errors import error_response

__all__ = ["error_response"]
