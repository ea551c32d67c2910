"""Process-wide logging setup shared by the router and the engine server: text or one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys


def _trace_ids() -> dict[str, str]:
    """trace_id/span_id of the current OpenTelemetry span; {} when none (or OpenTelemetry never loaded:
    it is looked up, not imported, so logging costs nothing extra with tracing off)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), **_trace_ids()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
