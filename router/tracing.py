"""OpenTelemetry tracing for routed requests: off by default, and then free (no spans, no imports).

Turned on by the standard environment variable ``OTEL_TRACES_EXPORTER`` (``otlp`` or ``console``; unset or
``none`` = off). ``otlp`` exports OTLP/HTTP protobuf and honours the SDK's own variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SERVICE_NAME`` — default ``prefix-router`` —, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``…).
Needs the ``otel`` extra; turning it on without it fails at startup, naming the extra.

Per routed request: one SERVER span (an incoming W3C ``traceparent`` is continued) with a ``route`` child
per policy decision and an ``upstream`` CLIENT child per attempt, whose context goes to the engine as
``traceparent``; the upstream span carries ``first_token`` and ``stream_end`` events.
This module imports no opentelemetry at import time; `from_env` does, once, only when tracing is on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

SERVICE_NAME = "prefix-router"
EXPORTERS = ("otlp", "console")


class TracingUnavailable(ValueError):
    """Tracing is asked for but cannot run (unknown exporter, OpenTelemetry not installed)."""


def check_env(env: Mapping[str, str] | None = None) -> None:
    """Fail fast, before listening, when the environment asks for tracing the install cannot give."""
    name = requested_exporter(env)
    if name is None:
        return
    import importlib.util

    module = "opentelemetry.exporter.otlp.proto.http" if name == "otlp" else "opentelemetry.sdk"
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={name} but {module} is not installed: "
                                 "pip install 'prefix-router[otel]' (or unset OTEL_TRACES_EXPORTER)")


def requested_exporter(env: Mapping[str, str] | None = None) -> str | None:
    """The exporter OTEL_TRACES_EXPORTER asks for, or None when tracing is off."""
    env = os.environ if env is None else env
    value = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not value or value == "none":
        return None
    if value not in EXPORTERS:
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={value!r}: the router supports {', '.join(EXPORTERS)} "
                                 "or none")
    return value


class Tracing:
    """A tracer plus the W3C propagator; built only when tracing is on."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.provider = provider
        self.tracer = provider.get_tracer("prefix-router")
        self.propagator = TraceContextTextMapPropagator()
        self.SERVER = trace.SpanKind.SERVER
        self.CLIENT = trace.SpanKind.CLIENT

    def start_server_span(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Any:
        parent = self.propagator.extract(carrier=headers)
        return self.tracer.start_span(name, context=parent, kind=self.SERVER, attributes=attributes)

    def start_child(self, parent: Any, name: str, attributes: dict[str, Any], *, client: bool = False) -> Any:
        ctx = self.trace.set_span_in_context(parent)
        kind = self.CLIENT if client else self.trace.SpanKind.INTERNAL
        return self.tracer.start_span(name, context=ctx, kind=kind, attributes=attributes)

    def inject(self, span: Any, headers: dict[str, str]) -> None:
        self.propagator.inject(headers, context=self.trace.set_span_in_context(span))

    def use(self, span: Any) -> Any:
        """Context manager making ``span`` current (so logs carry its ids); does not end it."""
        return self.trace.use_span(span, end_on_exit=False)

    def error(self, span: Any, description: str) -> None:
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, description))


def from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing as the environment asks for it; None when off. Raises TracingUnavailable (naming the
    `otel` extra) when it is on but the OpenTelemetry SDK is not installed."""
    exporter_name = requested_exporter(env)
    if exporter_name is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise TracingUnavailable("OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: "
                                 "pip install 'prefix-router[otel]' (or unset OTEL_TRACES_EXPORTER)") from exc
    env = os.environ if env is None else env
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: "
                                     "pip install 'prefix-router[otel]'") from exc
        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)
