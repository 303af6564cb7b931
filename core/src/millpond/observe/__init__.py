"""What the core keeps of observability, throttled log lines: spans, metrics, health probes, the
log context and the logging set-up are millpond-tracing's, -metrics', -health's and -cli's."""
