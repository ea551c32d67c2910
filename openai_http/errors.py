"""OpenAI-format error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal either server sends goes through `error_response`, so a client (and the router reading an
engine's answer) parses one shape whichever server spoke.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for ``status``: listed ones as OpenAI names them, else by class (4xx the client's)."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, err_type: str | None = None, *, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type or error_type(status), "param": param,
                      "code": code if code is not None else status}}


def error_response(message: str, status: int, err_type: str | None = None, *, param: str | None = None,
                   code: str | int | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, status, err_type, param=param, code=code), status=status,
                             headers=headers)
