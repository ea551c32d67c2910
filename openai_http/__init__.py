"""What both servers (the router and the engine server) say the same way over HTTP.

OpenAI error bodies (`errors`), the request-id and error middleware (`middleware`), and reading a JSON
body under the hostile-input rules (`body`). A leaf: it depends on aiohttp only, so `router` and
`engine_server`, which never import each other, can both import it (rules in tests/test_imports.py).
"""

from openai_http.body import (
    BodyError,
    install_json_protocol_errors,
    parse_json_object,
    read_body,
    read_json_object,
)
from openai_http.errors import error_body, error_response
from openai_http.middleware import REQUEST_ID, REQUEST_ID_HEADER, request_id_and_errors

__all__ = [
    "REQUEST_ID",
    "REQUEST_ID_HEADER",
    "BodyError",
    "error_body",
    "error_response",
    "install_json_protocol_errors",
    "parse_json_object",
    "read_body",
    "read_json_object",
    "request_id_and_errors",
]
