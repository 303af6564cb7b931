"""millpond-tracing: a task's trip as OpenTelemetry SDK spans, set up from the `OTEL_*` variables.

`hooks.TracingHooks` is the `tracing` entry of the `millpond.hooks` group (`publish <queue>` ->
`process <queue>` -> the task body); `otel` installs the SDK's tracer provider and exporters from
`OTEL_*` (a producer may call `otel.configure_tracing()` itself); `attributes` names the span
attributes. The core reaches none of it but through the hooks contract.
"""
