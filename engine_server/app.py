"""The engine server's aiohttp application: OpenAI endpoints over any `Backend`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
GET /load (a cheap JSON load/cache report for the router), POST /tokenize (vLLM's shape; vllm-router's
`cache_aware` policy calls it on every replica for every request). The same code serves both backends, so
response shapes, metric names and error bodies cannot drift between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError, model_validator

from engine_server import protocol
from engine_server.backend import (
    OFF_LOOP_CHARS,
    Backend,
    BackendError,
    GenerationDelta,
    GenerationRequest,
    SamplingOptions,
    StreamDropped,
)
from engine_server.errors import error_response, validation_error_response
from engine_server.metrics import EngineMetrics
from openai_http import REQUEST_ID, REQUEST_ID_HEADER, BodyError, read_json_object, request_id_and_errors

log = logging.getLogger("engine_server")

BODY_TIMEOUT_S = 60.0  # a request body must arrive within this long after its headers (408)
T = TypeVar("T")


@dataclass
class ServerState:
    backend: Backend
    metrics: EngineMetrics
    default_max_tokens: int = 16
    draining: bool = False
    in_flight: int = 0
    start_error: str | None = None  # the backend's start() raised this

    @property
    def failure(self) -> str | None:
        """Why this replica can no longer serve (the server exits non-zero), or None."""
        return self.backend.failure or self.start_error

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1


STATE = web.AppKey("state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def read_json(request: web.Request) -> dict[str, Any] | web.Response:
    """The body as a JSON object, or the OpenAI-format 4xx to answer (see `openai_http.body`)."""
    try:
        return await read_json_object(request, BODY_TIMEOUT_S)
    except BodyError as exc:
        return await exc.respond_and_close(request, {REQUEST_ID_HEADER: request[REQUEST_ID]})


async def off_loop_if_large(fn: Callable[[str], T], text: str) -> T:
    """`fn(text)` in a worker thread when `text` is long: tokenizing megabytes takes seconds, and on the
    event loop it would stall /health until the router ejects this replica. Short texts stay inline."""
    if len(text) <= OFF_LOOP_CHARS:
        return fn(text)
    return await asyncio.to_thread(fn, text)


def _check_model(state: ServerState, model: str) -> web.Response | None:
    if model != state.backend.model_name:
        return error_response(f"The model `{model}` does not exist.", 404, param="model",
                              code="model_not_found")
    if state.draining:
        return error_response("server is draining", 503)
    if not state.backend.ready:
        return error_response("model is still loading", 503)
    return None


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    try:
        req: protocol.CompletionRequest | protocol.ChatCompletionRequest = (
            protocol.ChatCompletionRequest.model_validate(body) if chat
            else protocol.CompletionRequest.model_validate(body)
        )
    except ValidationError as exc:
        return validation_error_response(exc)
    if (bad := _check_model(state, req.model)) is not None:
        return bad
    backend = state.backend
    if isinstance(req, protocol.ChatCompletionRequest):
        prompts = [backend.render_chat([m.plain() for m in req.messages], req.tools)]
    else:
        prompts = req.prompts()
    sampling = req.sampling(state.default_max_tokens)
    for p in prompts:
        n_tok = await off_loop_if_large(backend.count_tokens, p)
        if n_tok + sampling.max_tokens > backend.max_model_len:
            return error_response(
                f"This model's maximum context length is {backend.max_model_len} tokens. However, you "
                f"requested {n_tok + sampling.max_tokens} tokens ({n_tok} in the messages, "
                f"{sampling.max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.", 400, param="messages" if chat else "prompt", code="context_length_exceeded")
    rid = request[REQUEST_ID]
    gens = [
        GenerationRequest(f"{rid}-{i}-{j}", p, _per_choice_seed(sampling, j))
        for i, p in enumerate(prompts)
        for j in range(req.n)
    ]
    resp_id = ("chatcmpl-" if chat else "cmpl-") + rid
    state.begin()
    try:
        if req.stream:
            return await _stream(request, state, gens, resp_id, req.model, chat, req.include_usage())
        return await _unary(state, gens, resp_id, req.model, chat)
    finally:
        state.end()


def _per_choice_seed(sampling: SamplingOptions, j: int) -> SamplingOptions:
    if j == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=sampling.seed + j)


async def _tracked(state: ServerState, gen: GenerationRequest) -> AsyncIterator[GenerationDelta]:
    """The backend's stream, with vLLM-named metrics observed on the way. Closing it aborts the engine."""
    t0 = time.monotonic()
    first = True
    last: GenerationDelta | None = None
    stream = state.backend.generate(gen)
    try:
        async for delta in stream:
            if first:
                state.metrics.observe_first_token(delta.prompt_tokens, delta.cached_tokens,
                                                  time.monotonic() - t0)
                first = False
            last = delta
            yield delta
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if last is not None and last.finish_reason:
        state.metrics.observe_finished(last.completion_tokens, last.finish_reason, time.monotonic() - t0)


async def _unary(state: ServerState, gens: list[GenerationRequest], resp_id: str, model: str,
                 chat: bool) -> web.Response:
    async def run(gen: GenerationRequest) -> tuple[str, GenerationDelta]:
        parts: list[str] = []
        last: GenerationDelta | None = None
        async with contextlib.aclosing(_tracked(state, gen)) as stream:
            async for d in stream:
                parts.append(d.text)
                last = d
        if last is None:
            raise BackendError("engine returned no output")
        return "".join(parts), last

    try:
        results = await _gather_or_cancel([run(g) for g in gens])
    except BackendError as exc:
        return error_response(str(exc), exc.status, exc.err_type)
    choices = [protocol.choice(i, text, last.finish_reason or "length", chat, chunk=False)
               for i, (text, last) in enumerate(results)]
    usage = _usage([last for _, last in results])
    return web.json_response(protocol.completion_body(resp_id, model, protocol.now(), choices, usage, chat,
                                                      chunk=False))


async def _gather_or_cancel(coros: list[Any]) -> list[Any]:
    """Like gather, but a failure or cancellation cancels the siblings (so their engine requests abort)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(lasts: list[GenerationDelta]) -> dict[str, Any]:
    # Prompt tokens count once per distinct prompt in OpenAI's usage; choices of one prompt share it.
    prompt = sum(d.prompt_tokens for d in lasts)
    cached = sum(d.cached_tokens for d in lasts)
    completion = sum(d.completion_tokens for d in lasts)
    return protocol.usage_body(prompt, completion, cached)


async def _stream(request: web.Request, state: ServerState, gens: list[GenerationRequest], resp_id: str,
                  model: str, chat: bool, include_usage: bool) -> web.StreamResponse:
    queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, gen: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(_tracked(state, gen)) as stream:
                async for d in stream:
                    await queue.put((index, d))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which reports it
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    resp: web.StreamResponse | None = None
    created = protocol.now()
    lasts: dict[int, GenerationDelta] = {}
    started: set[int] = set()
    try:
        # Wait for the first event before committing to a 200, so early engine errors get a real status.
        index, item = await queue.get()
        if isinstance(item, BackendError):
            return error_response(str(item), item.status, item.err_type)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           REQUEST_ID_HEADER: request[REQUEST_ID]})
        await resp.prepare(request)
        done = 0
        while True:
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                if isinstance(item, StreamDropped):
                    # Simulated engine crash: cut the connection without a final event.
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                msg = str(item) if isinstance(item, BackendError) else "internal engine error"
                await resp.write(protocol.sse({"error": {"message": msg, "type": "server_error",
                                                         "param": None, "code": 500}}))
                break
            elif item.text or item.finish_reason or index not in started:
                # (vLLM can yield empty deltas, e.g. for a skipped special token: they are not sent)
                first = index not in started
                started.add(index)
                lasts[index] = item
                ch = protocol.choice(index, item.text, item.finish_reason, chat, chunk=True, first=first)
                chunk = protocol.completion_body(resp_id, model, created, [ch], None, chat, chunk=True)
                if include_usage:
                    chunk["usage"] = None
                await resp.write(protocol.sse(chunk))
            if done == len(tasks):
                if include_usage:
                    usage = _usage(list(lasts.values()))
                    await resp.write(protocol.sse(
                        protocol.completion_body(resp_id, model, created, [], usage, chat, chunk=True)))
                await resp.write(protocol.sse("[DONE]"))
                break
            index, item = await queue.get()
        await resp.write_eof()
        return resp
    except (ConnectionResetError, ConnectionError):
        log.info("client went away rid=%s; aborting %d engine request(s)", request[REQUEST_ID], len(tasks))
        return resp if resp is not None else web.Response(status=499)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def models(request: web.Request) -> web.Response:
    backend = request.app[STATE].backend
    return web.json_response({
        "object": "list",
        "data": [{"id": backend.model_name, "object": "model", "created": protocol.now(),
                  "owned_by": "engine_server", "root": backend.model_name,
                  "max_model_len": backend.max_model_len}],
    })


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return error_response("draining", 503)
    if (failure := state.failure) is not None:
        return error_response(f"engine failed: {failure}", 503)
    if not state.backend.ready:
        return error_response("loading", 503)
    return web.json_response({"status": "ok"})


async def load(request: web.Request) -> web.Response:
    state = request.app[STATE]
    report = state.backend.load_report().to_json()
    report["draining"] = state.draining
    report["in_flight"] = state.in_flight
    report["time"] = time.time()
    return web.json_response(report)


class TokenizeRequest(BaseModel):
    """vLLM's `TokenizeCompletionRequest | TokenizeChatRequest`: a `prompt` or chat `messages` (other
    vLLM fields, e.g. `add_special_tokens`, are accepted and ignored)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[protocol.ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize as vLLM's OpenAI server answers it: `{count, max_model_len, tokens, token_strs}`.

    Chat messages go through the same chat template as /v1/chat/completions, so the ids are the prompt
    the engine would prefill. `token_strs` is always null (the sim's token ids are one-way hashes).
    """
    state = request.app[STATE]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    try:
        req = TokenizeRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error_response(exc)
    if req.model is not None and req.model != state.backend.model_name:
        return error_response(f"The model `{req.model}` does not exist.", 404, param="model",
                              code="model_not_found")
    if not state.backend.ready:
        return error_response("model is still loading", 503)
    try:
        text = (req.prompt if req.messages is None
                else state.backend.render_chat([m.plain() for m in req.messages], req.tools))
        ids = list(await off_loop_if_large(state.backend.encode, text or ""))
    except BackendError as exc:
        return error_response(str(exc), exc.status, exc.err_type)
    return web.json_response({"count": len(ids), "max_model_len": state.backend.max_model_len, "tokens": ids,
                              "token_strs": None})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.render(state.backend.load_report()),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(backend: Backend, *, default_max_tokens: int = 16, max_body_bytes: int = 8 * 1024 * 1024,
               start_backend: bool = True) -> web.Application:
    """Build the app. With `start_backend`, the backend starts in the background so /health can say 503
    while it loads (vLLM takes seconds to minutes), and stops on cleanup."""
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[request_id_and_errors(log, "internal server error")])
    state = ServerState(backend=backend, metrics=EngineMetrics(backend.model_name),
                        default_max_tokens=default_max_tokens)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/load", load)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if start_backend:
            task = asyncio.create_task(_start(state))
        yield
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await backend.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _start(state: ServerState) -> None:
    """Start the backend; a failure is recorded (not raised into a task nobody awaits), so `serve` exits."""
    backend = state.backend
    t0 = time.monotonic()
    try:
        await backend.start()
    except Exception as exc:
        state.start_error = backend.failure or f"{type(exc).__name__}: {exc}"
        log.error("backend %s failed to start: %s", backend.name, state.start_error,
                  exc_info=not isinstance(exc, BackendError))
        return
    log.info("backend %s ready in %.1fs, serving model %r", backend.name, time.monotonic() - t0,
             backend.model_name)
