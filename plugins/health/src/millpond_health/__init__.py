"""millpond-health: Kubernetes probes for a worker, `/livez` and `/readyz` over plain HTTP.

`hooks.HealthHooks` is the `health` entry of the `millpond.hooks` group: it serves the probes
when the worker is ready, if `health.port` is set. `probes` decides what live and ready mean,
`server` is the small HTTP server other hooks may add routes to (the metrics plugin's `/metrics`
shares the port when both name one), `settings` declares the `[health]` section. The core reaches
none of it but through the hooks contract and the settings entry point.
"""
