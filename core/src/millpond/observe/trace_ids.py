"""The ids of the current OpenTelemetry span, for log lines: the API only, whoever traces.

Log context reads them (`trace_id`, `span_id` on every line of a traced task); the spans
themselves are made by the tracing hooks plugin (`millpond-tracing`) or by the application.
"""

from __future__ import annotations

from opentelemetry import trace

_real = False
#: the placeholder provider seen last (the API's proxy): the same object next time means "none yet"
_placeholder: object = None


def provider_installed() -> bool:
    """Whether a real tracer provider is installed (by millpond-tracing or the application).

    The global provider can be set once per process, so a real one, once seen, stays; until then
    this costs one call and one identity check (the task hot path asks it for every task).
    """
    global _real, _placeholder
    if _real:
        return True
    provider = trace.get_tracer_provider()
    if provider is _placeholder:
        return False
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        _placeholder = provider
        return False
    _real = True
    return True


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, or None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
