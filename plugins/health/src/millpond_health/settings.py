"""The `[health]` settings section (`MILLPOND_HEALTH__*` in the environment)."""

from __future__ import annotations

from millpond.config.options import Option, Section

SECTION = Section(
    "health",
    "Health probes",
    (
        Option(
            "port",
            "int",
            None,
            "Serve /livez and /readyz (Kubernetes probes) on this "
            "port; 0 picks a free port (logged); unset means no health endpoint.",
            minimum=0,
            maximum=65535,
            nullable=True,
        ),
        Option(
            "host",
            "str",
            "0.0.0.0",
            "Address the health endpoint listens on "
            "(0.0.0.0: reachable by the kubelet on the pod's IP).",
        ),
        Option(
            "liveness_timeout",
            "float",
            30.0,
            "/livez fails when the consumer loop "
            "has not turned for this many seconds (a task running inline on solo counts as "
            "turning).",
            minimum=1,
        ),
    ),
)
