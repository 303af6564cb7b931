"""The ids of the current OpenTelemetry span, for log lines: the API only, whoever traces.

Log context reads them (`trace_id`, `span_id` on every line of a traced task); the spans
themselves are made by the tracing hooks plugin (`millpond-tracing`) or by the application.
"""

from __future__ import annotations

from opentelemetry import trace


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, or None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
