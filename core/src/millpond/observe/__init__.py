"""Cross-cutting concerns as hooks: tracing, metrics, log context; health probes."""
