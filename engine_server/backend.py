"""The one small interface between the HTTP layer and an engine.

Both backends (`vllm`, which drives vLLM's AsyncLLM, and `sim`, the simulated replica) implement
`Backend`. The HTTP layer (`engine_server.app`) knows nothing else about them, which is what keeps
response shapes, metrics and error bodies identical across backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

OFF_LOOP_CHARS = 16 * 1024  # prompts longer than this are tokenized in a worker thread, off the event loop


class BackendError(Exception):
    """An engine-side failure that should become an OpenAI error body (not a crash)."""

    def __init__(self, message: str, status: int = 500, err_type: str = "server_error") -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type


class PromptTooLong(BackendError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=400, err_type="invalid_request_error")


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate. `n > 1` is fanned out by the HTTP layer into several of these."""

    request_id: str
    prompt: str
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """One step of output. The first delta carries prompt/cached token counts; the last a finish reason."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # cumulative
    finish_reason: str | None = None  # "stop" | "length" | None while running


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the router polls cheaply from `/load` (JSON)."""

    model: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int  # tokens found, cumulative
    ready: bool
    draining: bool = False
    backend: str = ""
    max_num_seqs: int = 0  # the engine's concurrency limit (0: unknown); the router prices slot waits with it

    def to_json(self) -> dict[str, Any]:
        usage = self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
        return {
            "model": self.model,
            "backend": self.backend,
            "ready": self.ready,
            "draining": self.draining,
            "num_requests_running": self.running,
            "num_requests_waiting": self.waiting,
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_total": self.kv_blocks_total,
            "kv_cache_usage": round(usage, 6),
            "block_size": self.block_size,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "max_num_seqs": self.max_num_seqs,
        }


class Backend(Protocol):
    """An engine the HTTP layer can drive. All methods are called from the server's event loop."""

    name: str  # "vllm" | "sim"
    model_name: str  # the name served in /v1/models and required in requests
    max_model_len: int

    @property
    def ready(self) -> bool:
        """True once the engine has proved it serves (for vLLM: after its warm-up request)."""

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer serve (start-up failed, or it died), else None. The server exits
        non-zero on a failure, so a supervisor restarts it rather than it answering 503 forever."""

    async def start(self) -> None:
        """Load the model / build the engine. The server answers /health with 503 until this returns."""

    async def stop(self) -> None:
        """Release the engine (processes, threads)."""

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """The exact prompt text the engine sees for a chat request (the model's chat template)."""

    def encode(self, text: str) -> list[int]:
        """The token ids the engine prefills for ``text`` (served as vLLM's POST /tokenize)."""

    def count_tokens(self, text: str) -> int:
        """Prompt length in the engine's tokens (for max_model_len checks)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas. Cancelling the consumer (or closing the iterator) aborts the request in the engine."""

    def load_report(self) -> LoadReport: ...


class StreamDropped(BackendError):
    """Fault injection: the engine vanished mid-stream. The HTTP layer cuts the connection, no final event."""

    def __init__(self, message: str = "stream dropped (fault injection)") -> None:
        super().__init__(message, status=502, err_type="server_error")
