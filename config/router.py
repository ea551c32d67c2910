"""The router's configuration: one frozen, validated model, loadable from YAML.

Every bad value fails with a message naming the field path and the reason (`ConfigError`), so an operator
sees `replicas.1.url: must start with http:// or https://` instead of a stack trace.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from config.kv_events import KVEventsConfig

# Routes the router serves itself; `passthrough_paths` forwards other POST paths as they are.
ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
PASSTHROUGH_DEFAULT = ("/v1/embeddings", "/v1/score", "/v1/rerank")
_PASSTHROUGH_PATH = re.compile(r"/v1/[A-Za-z0-9._~/-]+")


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


class CalibrationConfig(_Frozen):
    """How the `cost` policy's time constants are set (router/calibration.py)."""

    mode: Literal["pinned", "online", "relative"] = Field(
        default="relative", description="pinned: the constants in policy.params (or their defaults), fixed; "
                                      "online: learned per replica from every finished request, starting there; "
                                      "relative: the configured constants times each replica's learned speed "
                                      "relative to the fleet's median replica"),
    forgetting: float = Field(default=0.99, gt=0.5, le=1.0,
                              description="weight past observations keep at each new one (0.99 ~ the last 100)")
    bound_factor: float = Field(default=10_000.0, gt=1.0,
                                description="learned constants stay within configured / f .. configured * f")
    clip: float = Field(default=0.5, gt=0, description="relative residual above which an observation is "
                                                       "down-weighted (outliers)")
    prior_spread: float = Field(default=1000.0, gt=0, description="prior standard deviation, in units of "
                                                                  "the configured value")
    deadband: float = Field(default=1.5, ge=1.0, description="relative: a speed within 1/deadband .. "
                                                             "deadband of the median counts as equal")
    min_observations: int = Field(default=30, ge=1, description="relative: observations before a "
                                                                "replica's speed is used")


class PolicyConfig(_Frozen):
    """Which policy routes, and its constructor parameters. The name and params are judged by the policy
    registry when the router builds the policy (`router.runtime.build_policy`, at start-up and on every
    reload), as a `ConfigError` naming the field: config imports nothing of the router, so the registry
    stays the one list of policies."""

    name: str = Field(default="cost", description="a policy of the router's registry "
                                                  "(router.policies.registry.POLICY_NAMES)")
    params: dict[str, Any] = Field(default_factory=dict, description="constructor parameters of the policy")
    calibration: CalibrationConfig | None = Field(
        default=None, description="cost only: learn the time constants online or pin them (default pinned)")

    @model_validator(mode="after")
    def _one_calibration(self) -> PolicyConfig:
        if self.calibration is not None and "calibration" in self.params:
            raise ValueError("calibration: set it here or in params, not both")
        return self

    def policy_kwargs(self) -> dict[str, Any]:
        """Constructor keyword arguments: params, plus the calibration settings when given."""
        if self.calibration is None:
            return dict(self.params)
        return {**self.params, "calibration": self.calibration.model_dump()}


class HashingSettings(_Frozen):
    """Block hashing of prompts (the router builds `router.features.hashing.HashingConfig` from it)."""

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


class ClientTimeoutSettings(_Frozen):
    """How long the router waits for its own clients (slow or stalled senders hold no slot for long)."""

    header_s: float = Field(default=60.0, gt=0, le=3600, description="a connection must send complete "
                            "request headers within this long of opening or of its previous response (also "
                            "the keep-alive idle timeout); applied at start-up, a reload does not change it")
    body_s: float = Field(default=30.0, gt=0, le=3600, description="the whole request body must arrive "
                          "within this long after its headers, else 408; no in-flight slot is held meanwhile")


class RetrySettings(_Frozen):
    max_attempts: int = Field(default=3, ge=1, le=10, description="tries on distinct replicas, first included")
    retry_statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    budget_ratio: float = Field(default=0.2, ge=0, le=1, description="fleet-wide: retries may add at most "
                                "this share of the requests seen in the last budget_window_s")
    budget_min_retries: int = Field(default=10, ge=0, description="retries always allowed per window on "
                                    "top of budget_ratio, so a quiet router can still retry")
    budget_window_s: float = Field(default=10.0, gt=0, le=600, description="sliding window of the budget")


class AdminSettings(_Frozen):
    """Browser-facing protections of /admin/* (DNS rebinding, cross-site requests)."""

    allowed_hosts: tuple[str, ...] = Field(default=(), description="Host names (without port) the admin "
                                           "API answers besides loopback ones (localhost, 127.0.0.1, ::1); "
                                           "checked while no admin key is configured")
    allowed_origins: tuple[str, ...] = Field(default=(), description="browser Origins allowed to call the "
                                             "admin API, e.g. https://ops.example.com; requests with another "
                                             "Origin than the Host they were sent to get 403")


class KeyLimits(_Frozen):
    """Per-key limits; None = unlimited. burst without requests_per_s means nothing, so it is refused."""

    requests_per_s: float | None = Field(default=None, gt=0, description="sustained rate (token-bucket refill)")
    burst: int | None = Field(default=None, ge=1, description="requests at once after idling; "
                                                             "default ceil(requests_per_s)")
    max_concurrent: int | None = Field(default=None, ge=1, description="requests in flight at once, "
                                                                      "a stream counting until it ends")

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> KeyLimits:
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError("burst needs requests_per_s on the same entry")
        return self


def _check_key(secret: str) -> str:
    # Never put the secret in the message: ConfigErrors are printed and logged.
    if not secret:
        raise ValueError("key is empty")
    if not all(33 <= ord(c) <= 126 for c in secret):
        raise ValueError("key must be printable ASCII without spaces (it travels in an HTTP header)")
    return secret


def _key_from_env(var: str) -> str:
    if not os.environ.get(var, "").strip():
        raise ValueError(f"environment variable {var} is not set or empty")
    return _check_key(os.environ[var].strip())


def _key_from_file(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise ValueError(f"key file {path} is empty")
    return _check_key(text.strip())


class KeySpec(KeyLimits):
    """One API key: exactly one of value / env / file, plus an optional name and its own limits.

    env and file are read when the config is loaded (a reload re-reads them, which is how keys rotate);
    file contents are stripped. The secret lives in a private attribute: never in repr, dumps or errors.
    """

    name: str | None = Field(default=None, min_length=1, description="label in metrics and logs; "
                                                                     "default api_keys.N / admin_keys.N")
    value: SecretStr | None = Field(default=None, description="the key inline; prefer env or file")
    env: str | None = Field(default=None, min_length=1, description="environment variable holding the key")
    file: Path | None = Field(default=None, description="file holding the key; relative = to the working dir")
    _secret: str = PrivateAttr(default="")

    @field_validator("value")
    @classmethod
    def _value_ok(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _check_key(v.get_secret_value())
        return v

    @field_validator("env")
    @classmethod
    def _env_set(cls, v: str | None) -> str | None:
        if v is not None:
            _key_from_env(v)
        return v

    @field_validator("file")
    @classmethod
    def _file_readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            _key_from_file(v)
        return v

    @model_validator(mode="after")
    def _resolve(self) -> KeySpec:
        given = [f for f in ("value", "env", "file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of value, env, file (got {', '.join(given) or 'none'})")
        if self.value is not None:
            self._secret = self.value.get_secret_value()
        elif self.env is not None:
            self._secret = _key_from_env(self.env)
        else:
            assert self.file is not None
            self._secret = _key_from_file(self.file)
        return self

    def secret(self) -> str:
        return self._secret


class AuthConfig(_Frozen):
    """API keys. No key at all (both lists empty) = auth off: every route is open, fine on loopback only.

    With any key configured, /v1/* needs a user or admin key and /admin/* an admin key; /health and
    /metrics stay open. Names (or the api_keys.N defaults) must be unique, keys distinct.
    """

    api_keys: tuple[KeySpec, ...] = Field(default=(), description="keys for the OpenAI routes")
    admin_keys: tuple[KeySpec, ...] = Field(default=(), description="keys for /admin/* (and the OpenAI routes)")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def named_keys(self) -> list[tuple[str, bool, KeySpec]]:
        """(name, is_admin, spec) for every key, unnamed ones called `api_keys.N` / `admin_keys.N`."""
        return [(k.name or f"{field}.{i}", field == "admin_keys", k)
                for field in ("api_keys", "admin_keys") for i, k in enumerate(getattr(self, field))]

    @model_validator(mode="after")
    def _distinct(self) -> AuthConfig:
        names: set[str] = set()
        secrets: dict[str, str] = {}
        for name, _, spec in self.named_keys():
            if name in names:
                raise ValueError(f"key name {name!r} is used twice")
            names.add(name)
            if spec.secret() in secrets:
                raise ValueError(f"keys {secrets[spec.secret()]!r} and {name!r} are the same key")
            secrets[spec.secret()] = name
        return self


class LimitsConfig(_Frozen):
    """Admission limits. Beyond max_in_flight the router answers 503 + Retry-After at once (the fleet is
    full, not the caller over quota, so not 429); it queues nothing, so memory stays bounded by
    max_in_flight x max_body_bytes. Per-key limits answer 429 + Retry-After and apply only with auth on.
    """

    max_in_flight: int | None = Field(default=4096, ge=1, description="OpenAI-route requests admitted at "
                                                                      "once, router-wide; null = unbounded")
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After of overload 503s and "
                                                                     "concurrency 429s")
    default_key_limits: KeyLimits = Field(default=KeyLimits(), description="for keys that set none: "
                                          "rate+burst come as a pair, max_concurrent on its own")


class DiscoveryConfig(_Frozen):
    """Where the replica list comes from: ``static`` (the ``replicas`` list) or ``kubernetes`` (ready pods
    or EndpointSlice endpoints matching ``label_selector``, kept current by a watch; see router.discovery).
    """

    kind: Literal["static", "kubernetes"] = "static"
    namespace: str = Field(default="default", min_length=1)
    label_selector: str | None = Field(default=None, min_length=1, description="e.g. app=vllm; "
                                       "pods with kind=pods, EndpointSlices with kind=endpointslices")
    resource: Literal["pods", "endpointslices"] = "pods"
    port: int | None = Field(default=None, ge=1, le=65535, description="engine port on each pod/endpoint")
    port_name: str | None = Field(default=None, min_length=1, description="named container/slice port")
    scheme: Literal["http", "https"] = "http"
    models: tuple[str, ...] = Field(default=(), description="models of discovered replicas; empty = learn")
    kubeconfig: Path | None = Field(default=None, description="kubeconfig file; default in-cluster config")
    debounce_s: float = Field(default=0.2, ge=0, le=10, description="batch bursts of changes")

    @model_validator(mode="after")
    def _complete(self) -> DiscoveryConfig:
        if self.kind != "kubernetes":
            return self
        if self.label_selector is None:
            raise ValueError("label_selector: required when kind is kubernetes")
        if (self.port is None) == (self.port_name is None):
            raise ValueError("port / port_name: give exactly one when kind is kubernetes")
        return self


def _readable_file(v: Path) -> Path:
    try:
        with v.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {v}: {exc.strerror or exc}") from None
    return v


class TLSConfig(_Frozen):
    """HTTPS on the router's listening socket. The certificate and key files are watched (their mtime,
    size and inode, every ``reload_interval_s``) and a changed pair is loaded for new connections; a pair
    that does not load keeps the running one (logged, ``router_tls_cert_reloads_total{result="error"}``).
    """

    cert_file: Path = Field(description="PEM certificate chain, leaf first")
    key_file: Path = Field(description="PEM private key of the certificate (unencrypted)")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(default="TLSv1.2", description="oldest protocol "
                                                      "version clients may use")
    reload_interval_s: float = Field(default=1.0, gt=0, le=3600, description="how often the files' "
                                     "mtimes are checked for a renewed certificate")

    @field_validator("cert_file", "key_file")
    @classmethod
    def _readable(cls, v: Path) -> Path:
        return _readable_file(v)

    @model_validator(mode="after")
    def _loads(self) -> TLSConfig:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cert_file / key_file: do not load as a certificate and its key: {exc}") from None
        return self


class RouterConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    replicas: tuple[ReplicaConfig, ...] = Field(default=(), description="static replica list")
    policy: PolicyConfig = PolicyConfig()
    hashing: HashingSettings = HashingSettings()
    health: HealthSettings = HealthSettings()
    load: LoadSettings = LoadSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    retry: RetrySettings = RetrySettings()
    client_timeouts: ClientTimeoutSettings = ClientTimeoutSettings()
    admin: AdminSettings = AdminSettings()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    tls: TLSConfig | None = Field(default=None, description="serve HTTPS instead of HTTP; null = plain HTTP")
    kv_events: KVEventsConfig = Field(default=KVEventsConfig(), description="follow the engines' KV cache "
                                      "events for exact prefix matches (config/kv_events.py)")
    replica_header: str | None = Field(default="x-router-replica",
                                       description="response header naming the chosen replica; null = off")
    session_header: str | None = Field(default="x-session-id",
                                       description="request header whose value is the session affinity key")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    passthrough_paths: tuple[str, ...] = Field(
        default=PASSTHROUGH_DEFAULT,
        description="POST paths forwarded to a replica serving the body's model as they are (no prefix "
        "routing: placed by load), e.g. /v1/embeddings; each must start with /v1/ (auth and limits apply). "
        "Not by default: /v1/responses (a stored response lives on the replica that made it)")
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    router_processes: int = Field(default=1, ge=1, le=4096,
                                  description="router processes sharing the traffic, counting every pod's "
                                  "--workers (e.g. 2 pods x 4 workers = 8); each sees only its own requests "
                                  "in flight, and the cost policy prices the rest by this count. Left at 1, "
                                  "--workers N makes it N")
    gc_tuning: bool = Field(default=True, description="freeze the start-up objects out of the garbage "
                            "collector's reach and collect young objects every 50,000 instead of 700 "
                            "(router/gc_tuning.py); false leaves Python's defaults")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("passthrough_paths")
    @classmethod
    def _passthrough(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not _PASSTHROUGH_PATH.fullmatch(path):
                raise ValueError(f"{path!r} must be /v1/ followed by letters, digits and . _ ~ - / "
                                 "(auth and limits apply to /v1/*)")
            if path in ROUTED_PATHS:
                raise ValueError(f"{path!r} is one of the router's own routes")
        if len(set(paths)) != len(paths):
            raise ValueError("a path is listed twice")
        return paths

    @model_validator(mode="after")
    def _unique_replicas(self) -> RouterConfig:
        seen: set[str] = set()
        for r in self.replicas:
            if r.name in seen:
                raise ValueError(f"replica name {r.name!r} is used twice")
            seen.add(r.name)
        return self

    @model_validator(mode="after")
    def _discovered_replicas(self) -> RouterConfig:
        if self.discovery.kind == "kubernetes" and self.replicas:
            raise ValueError("replicas: must be empty with discovery.kind kubernetes (discovery fills it)")
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
