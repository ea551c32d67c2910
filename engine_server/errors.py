"""OpenAI-format error bodies: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server answers, whatever the backend, goes through `error_response` so clients and the
router can parse one shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, status: int, err_type: str | None = None, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err_type or _TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code if code is not None else status,
        }
    }


def error_response(message: str, status: int, err_type: str | None = None, param: str | None = None,
                   code: str | int | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, status, err_type, param, code), status=status,
                             headers=headers)


def validation_error_response(exc: ValidationError) -> web.Response:
    """400 naming the first offending field, as OpenAI does (`param` is the dotted field path)."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return error_response(f"{param}: {msg}" if param else msg, 400, param=param or None)
