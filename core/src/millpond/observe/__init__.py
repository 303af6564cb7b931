"""Cross-cutting concerns the core keeps: log context as hooks, throttled log lines, trace ids
(tracing, metrics and health probes are plugins: millpond-tracing, millpond-metrics,
millpond-health)."""
