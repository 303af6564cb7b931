"""Throttled log lines, what the core keeps of observability (tracing, metrics, health probes,
the log context and the process's logging set-up are plugins': tracing, metrics, health, cli)."""
