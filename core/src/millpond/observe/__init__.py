"""Cross-cutting concerns the core keeps: log context as hooks, throttled log lines (tracing,
metrics, health probes and the process's logging set-up are plugins' and the CLI's)."""
