"""OpenAI-format error responses for the router (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

from aiohttp import web

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error", 408: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


def error_response(message: str, status: int, *, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}
    return web.json_response(body, status=status, headers=headers)
