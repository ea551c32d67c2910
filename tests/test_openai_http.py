"""openai_http: the error bodies and the request-id/error middleware both servers answer with."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from openai_http import REQUEST_ID, REQUEST_ID_HEADER, error_body, request_id_and_errors
from openai_http.errors import error_type


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (408, "invalid_request_error"), (409, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "server_error"), (502, "server_error"), (503, "service_unavailable"),
])
def test_an_error_type_follows_openai_and_an_unlisted_4xx_is_the_clients(status: int, kind: str) -> None:
    assert error_type(status) == kind


def test_an_error_body_has_openais_four_fields_and_the_status_as_default_code() -> None:
    assert error_body("no", 404, param="model") == {
        "error": {"message": "no", "type": "not_found_error", "param": "model", "code": 404}}


async def _client() -> TestClient:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"rid": request[REQUEST_ID]})

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[request_id_and_errors(logging.getLogger("test"), "internal test error")])
    app.router.add_get("/echo", echo)
    app.router.add_get("/broken", broken)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.mark.parametrize(("sent", "kept"), [("abc-123", True), ("x" * 129, False), ("é", False), ("", False)])
async def test_a_sane_request_id_is_kept_and_echoed_and_another_is_replaced(sent: str, kept: bool) -> None:
    client = await _client()
    try:
        resp = await client.get("/echo", headers={REQUEST_ID_HEADER: sent} if sent else {})
        rid = (await resp.json())["rid"]
        assert resp.headers[REQUEST_ID_HEADER] == rid
        assert (rid == sent) is kept
        assert 0 < len(rid) <= 128
    finally:
        await client.close()


async def test_a_handlers_bug_and_an_unknown_route_answer_in_openais_format() -> None:
    client = await _client()
    try:
        bug = await client.get("/broken")
        assert bug.status == 500
        assert (await bug.json())["error"] == {"message": "internal test error", "type": "server_error",
                                               "param": None, "code": 500}
        missing = await client.get("/nowhere")
        assert missing.status == 404
        assert (await missing.json())["error"]["message"] == "no route for GET /nowhere"
    finally:
        await client.close()
