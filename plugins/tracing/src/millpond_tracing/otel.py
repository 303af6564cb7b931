"""Setting up OpenTelemetry tracing the OpenTelemetry way: from the standard `OTEL_*` variables.

`OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`, any exporter registered in the SDK's
`opentelemetry_traces_exporter` entry-point group, or a comma-separated list),
`OTEL_EXPORTER_OTLP_ENDPOINT` with its `_PROTOCOL`, `_HEADERS`, `_COMPRESSION` companions (and their
`_TRACES_` forms), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG`, the `OTEL_BSP_*` batch settings. `OTEL_SDK_DISABLED=true` turns it off.
With neither an exporter nor an endpoint set, nothing is installed and tracing costs nothing.

The SDK reads most of these itself; millpond validates them first, because the SDK only warns about
a misspelt sampler or exporter and carries on without what the user asked for.

If the application installed its own tracer provider (in the app module, or through
`opentelemetry-instrument`), millpond uses it and installs nothing: the tracing hook finds
whichever provider is installed when it makes a span. The worker calls `configure_tracing` after
the app is imported and before the pool starts (prefork children inherit the provider; the SDK
restarts its export thread after a fork). A producer process may call it too, to get the same
set-up from the same variables.

The metrics plugin (`millpond-metrics`) reads the metrics variables with the helpers here. The
worker, `millpond send` and `millpond beat` reach `configure_tracing` through the
`process_starting` hook (`TracingHooks`), never directly.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace

from millpond.exceptions import ConfigurationError

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: the SDK's registry of span exporters by name (`console`, `otlp_proto_http`, ...)
EXPORTER_GROUP = "opentelemetry_traces_exporter"

_provider: Any = None
_real = False
#: the placeholder provider seen last (the API's proxy): the same object next time means "none yet"
_placeholder: object = None


def provider_installed() -> bool:
    """Whether a real tracer provider is installed (by `configure_tracing` or the application).

    The global provider can be set once per process, so a real one, once seen, stays; until then
    this costs one call and one identity check (the hot path asks it per span it would make).
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


def env(name: str) -> str:
    return (os.environ.get(name) or "").strip()


def sdk_disabled() -> bool:
    return env("OTEL_SDK_DISABLED").lower() == "true"


def exporter_names(variable: str, signal: str) -> list[str]:
    """The exporters a `OTEL_*_EXPORTER` variable names; `otlp` when only an endpoint is set."""
    raw = env(variable)
    if not raw:
        endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT") or env(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [n for n in (n.strip().lower() for n in raw.split(",")) if n and n != "none"]


def protocol(signal: str) -> str:
    value = (
        env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).lower()
    if value not in ("http/protobuf", "grpc"):
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={value!r} is not supported by the Python exporters "
            "millpond uses; use http/protobuf (port 4318) or grpc (port 4317, needs "
            "pip install opentelemetry-exporter-otlp-proto-grpc)"
        )
    return value


def grpc_missing(exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter ({exc}): "
        "pip install opentelemetry-exporter-otlp-proto-grpc, or use http/protobuf (port 4318)"
    )


def _check_sampler() -> None:
    name = env("OTEL_TRACES_SAMPLER").lower()
    if not name:
        return
    if name not in SAMPLERS:
        raise ConfigurationError(
            f"OTEL_TRACES_SAMPLER={name!r} is not a sampler; use one of {', '.join(SAMPLERS)}"
        )
    if name.endswith("traceidratio"):
        arg = env("OTEL_TRACES_SAMPLER_ARG")
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigurationError(
                f"OTEL_TRACES_SAMPLER_ARG={arg!r} must be a ratio between 0 and 1 for the "
                f"{name} sampler (e.g. 0.1 keeps one trace in ten)"
            )


def resource(default_service_name: str) -> Any:
    """The SDK resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else the default name."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    detected = Resource.create({})
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: default_service_name}))
    return detected


def _otlp_exporter() -> Any:
    if protocol("traces") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise grpc_missing(exc) from exc
        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _registered_exporter(name: str) -> Any:
    """An exporter from the SDK's entry-point group (what `opentelemetry-instrument` uses)."""
    from stevedore import DriverManager
    from stevedore.exception import NoMatches

    try:
        manager: DriverManager[Any] = DriverManager(
            namespace=EXPORTER_GROUP, name=name, invoke_on_load=True
        )
    except NoMatches:
        from stevedore import ExtensionManager

        known = sorted({"otlp", *ExtensionManager(EXPORTER_GROUP).names()})
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER names {name!r}, which is not an installed span exporter; "
            f"installed: {', '.join(known)} (comma-separated for several, none for no export)"
        ) from None
    except Exception as exc:
        raise ConfigurationError(f"the span exporter {name!r} cannot be created: {exc}") from exc
    return manager.driver


def configure_tracing(default_service_name: str = "millpond") -> bool:
    """Install a tracer provider from the `OTEL_*` variables, unless one is installed already;
    returns whether a real provider is in place afterwards.

    Raises ConfigurationError (naming the variable and what is allowed) for a bad exporter,
    protocol or sampler, so a typo fails at start-up instead of silently tracing nothing.
    """
    global _provider
    if provider_installed():
        return True  # the application (or an earlier call) configured OpenTelemetry
    if sdk_disabled():
        return False
    names = exporter_names("OTEL_TRACES_EXPORTER", "traces")
    if not names:
        return False
    _check_sampler()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_otlp_exporter() if n == "otlp" else _registered_exporter(n) for n in names]
    provider = TracerProvider(resource=resource(default_service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def flush(timeout_millis: int = 5000) -> None:
    """Export every finished span now (a prefork child does before `os._exit`)."""
    force = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force is not None:
        force(timeout_millis)


def shutdown() -> None:
    """Flush and stop the tracer provider, if `configure_tracing` installed it; flush otherwise
    (a provider the application installed is the application's to stop)."""
    global _provider
    if _provider is None:
        flush()
        return
    provider, _provider = _provider, None
    provider.shutdown()
