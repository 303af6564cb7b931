"""The observability app, plus a span processor of the user's own added in the app module: it
must see the worker's spans (it tags each one it sees)."""

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor

from tests.observability.obs_app import app


class Tag(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        span.set_attribute("obs.tagged_by", "user processor")


provider = trace.get_tracer_provider()
add = getattr(provider, "add_span_processor", None)
assert add is not None, f"no SDK provider installed before the app module: {provider!r}"
add(Tag())

__all__ = ["app"]
