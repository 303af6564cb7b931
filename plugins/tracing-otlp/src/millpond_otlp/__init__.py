"""millpond-otlp: a fast OTLP/HTTP span exporter for the OpenTelemetry SDK.

    pip install millpond-otlp
    OTEL_TRACES_EXPORTER=millpond_otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 ...

It registers itself in the SDK's `opentelemetry_traces_exporter` entry-point group under the name
`millpond_otlp`, so `OTEL_TRACES_EXPORTER=millpond_otlp` selects it in `millpond worker`, in
`millpond_tracing.otel.configure_tracing()` and in `opentelemetry-instrument`. In code:

    from millpond_otlp import OTLPSpanExporter
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

It writes the same request bytes as the standard OTLP/HTTP exporter for the same spans, for a
fraction of the CPU; see `millpond_otlp.exporter` for what it does not support.
"""

from millpond_otlp.encode import encode_request
from millpond_otlp.exporter import DEFAULT_ENDPOINT, USER_AGENT, VERSION, OTLPSpanExporter

__version__ = VERSION
__all__ = ["DEFAULT_ENDPOINT", "USER_AGENT", "OTLPSpanExporter", "__version__", "encode_request"]
