"""The router's configuration: one frozen, validated model, loadable from YAML.

Every bad value fails with a message naming the field path and the reason (`ConfigError`), so an operator
sees `replicas.1.url: must start with http:// or https://` instead of a stack trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaConfig(_Frozen):
    name: str = Field(min_length=1, description="stable name; shown in headers, metrics and logs")
    url: str = Field(description="base URL of the engine server, e.g. http://127.0.0.1:8001")
    models: tuple[str, ...] = Field(default=(), description="models served; empty = learn from /v1/models")
    weight: float = Field(default=1.0, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class PolicyConfig(_Frozen):
    name: str = Field(default="cost", description="round_robin, random, least_load, power_of_two, "
                                                  "consistent_hash, cache_aware, cost")
    params: dict[str, Any] = Field(default_factory=dict, description="constructor parameters of the policy")


class HashingConfig(_Frozen):
    block_chars: int = Field(default=64, ge=8, le=65536,
                             description="characters per prefix block; smaller = finer matching, more hashes")


class HealthSettings(_Frozen):
    check_interval_s: float = Field(default=2.0, gt=0)
    check_timeout_s: float = Field(default=1.0, gt=0)
    failures_to_eject: int = Field(default=3, ge=1, description="consecutive request failures")
    checks_to_eject: int = Field(default=2, ge=1, description="consecutive failed /health checks")
    base_ejection_s: float = Field(default=5.0, gt=0)
    max_ejection_s: float = Field(default=120.0, gt=0)
    successes_to_readmit: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _order(self) -> HealthSettings:
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError("max_ejection_s must be >= base_ejection_s")
        return self


class LoadSettings(_Frozen):
    poll_interval_s: float = Field(default=0.5, gt=0, description="how often each replica's /load is read")
    stale_after_s: float = Field(default=3.0, gt=0, description="older load reports count as missing")


class TimeoutSettings(_Frozen):
    connect_s: float = Field(default=2.0, gt=0)
    first_byte_s: float = Field(default=120.0, gt=0, description="until the engine's response headers")
    idle_s: float = Field(default=60.0, gt=0, description="max silence between streamed chunks")
    total_s: float = Field(default=900.0, gt=0, description="a whole non-streamed request")


class RetrySettings(_Frozen):
    max_attempts: int = Field(default=3, ge=1, le=10, description="tries on distinct replicas, first included")
    retry_statuses: tuple[int, ...] = (429, 500, 502, 503, 504)


class RouterConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    replicas: tuple[ReplicaConfig, ...] = Field(default=(), description="static replica list")
    policy: PolicyConfig = PolicyConfig()
    hashing: HashingConfig = HashingConfig()
    health: HealthSettings = HealthSettings()
    load: LoadSettings = LoadSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    retry: RetrySettings = RetrySettings()
    replica_header: str | None = Field(default="x-router-replica",
                                       description="response header naming the chosen replica; null = off")
    session_header: str | None = Field(default="x-session-id",
                                       description="request header whose value is the session affinity key")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _unique_replicas(self) -> RouterConfig:
        seen: set[str] = set()
        for r in self.replicas:
            if r.name in seen:
                raise ValueError(f"replica name {r.name!r} is used twice")
            seen.add(r.name)
        return self


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def parse_config(data: Any) -> RouterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping at the top level")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def load_config(path: str | Path) -> RouterConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data)
