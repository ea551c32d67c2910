"""The router's `kv_events` section: follow the engines' KV cache events for exact prefix matches.

With ``enabled``, the router subscribes to every replica that publishes (vLLM's ``--kv-events-config``, or
our engine server's ``--kv-events-*`` flags), keeps an exact per-replica block index
(`router.kv_events`), and offers each request's exact match to the routing policy. Endpoints come from a
replica's ``/load`` (``discover``) unless listed under ``replicas`` (a stock ``vllm serve`` has no /load:
give ``block_size`` and ``model`` there too). The request's tokens are computed as the engines will:
``tokenizer`` is ``sim`` (the sim backend's rule) or the model's path / hub id (needs ``transformers``).

Applied at start-up: a reload changes which replicas are followed, not this section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _zmq_endpoint(v: str | None) -> str | None:
    if v is not None and not v.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZMQ endpoint (tcp://host:port, ipc://path)")
    if v is not None and "*" in v:
        raise ValueError("a bind wildcard (*) is the engine's side: give the replica's host")
    return v


class KVEventSourceConfig(_Frozen):
    """Where one replica publishes (what its /load would say)."""

    endpoint: str = Field(description="the engine's PUB endpoint, e.g. tcp://10.0.0.7:5557")
    replay_endpoint: str | None = Field(default=None, description="its replay (ROUTER) endpoint; null = none")
    topic: str = ""
    block_size: int | None = Field(default=None, ge=1, description="KV block size in tokens; null = from /load")
    model: str | None = Field(default=None, min_length=1, description="served model name; null = from /load")

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _endpoints(cls, v: str | None) -> str | None:
        return _zmq_endpoint(v)


class KVEventsConfig(_Frozen):
    enabled: bool = False
    tokenizer: str | None = Field(default=None, min_length=1, description="sim, or the engines' model path "
                                  "or hub id (their tokenizer and chat template); required when enabled")
    sim_chars_per_token: int = Field(default=4, ge=1, description="the sim engines' --chars-per-token")
    discover: bool = Field(default=True, description="read replicas' event endpoints from their /load")
    rediscover_s: float = Field(default=10.0, gt=0, le=3600, description="how often /load is re-read for "
                                "changed endpoints (and new replicas tried)")
    replicas: dict[str, KVEventSourceConfig] = Field(default_factory=dict, description="replica name -> "
                                                     "its endpoints, instead of /load")
    replay_timeout_s: float = Field(default=5.0, gt=0, le=600)
    idle_probe_s: float = Field(default=2.0, gt=0, le=600, description="when the stream is idle this long, "
                                "ask for a replay from the next sequence (finds a lost last batch)")

    @model_validator(mode="after")
    def _tokenizer_when_enabled(self) -> KVEventsConfig:
        if self.enabled and self.tokenizer is None:
            raise ValueError("tokenizer: required when enabled (sim, or the model's path or hub id)")
        return self
