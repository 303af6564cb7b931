"""The `[health]` settings section (`MILLPOND_HEALTH__*` in the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from millpond.config.options import Section, declared, setting


@dataclass(frozen=True)
class HealthSettings:
    """The probes' settings: one field per setting, as the core declares its own."""

    port: int | None = setting(
        None,
        "Serve /livez and /readyz (Kubernetes probes) on this port; 0 picks a free port (logged);"
        " unset means no health endpoint.",
        minimum=0,
        maximum=65535,
    )
    host: str = setting(
        "0.0.0.0",
        "Address the health endpoint listens on (0.0.0.0: reachable by the kubelet on the pod's "
        "IP).",
    )
    liveness_timeout: float = setting(
        30.0,
        "/livez fails when the consumer loop has not turned for this many seconds (a task running"
        " inline on solo counts as turning).",
        minimum=1,
    )


SECTION = Section("health", "Health probes", declared(HealthSettings))
