"""The `[control]` settings section: remote control, inspect and revoke on each worker.

Published by millpond-control under the `millpond.settings` entry-point group (`MILLPOND_CONTROL__ENABLED=
false`, `[control]` in millpond.toml, `Millpond(control={...})`). Defaults are Celery's where Celery
has one (`control_queue_ttl`, `control_queue_expires`, `worker_revokes_max`,
`worker_revoke_expires`), so a mixed fleet behaves alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting

COMMAND_SETS = ("all", "safe")
UNSIGNED = ("safe", "refuse")


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """The [control] section, read once at start-up: each field declares one setting (`SECTION`
    is derived from them)."""

    enabled: bool = setting(
        True,
        "Answer remote control (celery inspect/control, millpond inspect/control, Flower's "
        "buttons) on this worker. Off: no pidbox queue at all; revokes still hold through the "
        "revoked file and hello from other workers.",
    )
    commands: str = setting(
        "all",
        "Which commands the worker obeys: all, or safe (read-only inspect commands only).",
        choices=COMMAND_SETS,
    )
    deny: tuple[str, ...] = setting(
        (),
        "Command names this worker refuses whatever `commands` says (e.g. ['shutdown']).",
    )
    unsigned: str = setting(
        "safe",
        "With signing_key set, what an unsigned request may do: safe (read-only inspect "
        "commands; Celery clients and Flower cannot sign) or refuse (nothing).",
        choices=UNSIGNED,
    )
    exchange: str = setting(
        "celery",
        "Celery's control_exchange: the pidbox exchange is `<exchange>.pidbox`.",
    )
    queue_ttl: float = setting(
        300.0,
        "Seconds a request waits in a worker's pidbox queue (Celery's control_queue_ttl).",
        minimum=0.001,
    )
    queue_expires: float = setting(
        10.0,
        "Seconds a worker's pidbox queue outlives its worker (control_queue_expires).",
        minimum=0.001,
    )
    queue_exclusive: bool = setting(
        True,
        "Declare the pidbox queue exclusive (Celery's control_queue_exclusive).",
    )
    reply_ttl: float = setting(
        10.0,
        "Seconds a reply waits for its caller; then it is dropped (on Redis the reply key "
        "expires), so replies nobody reads never pile up.",
        minimum=0.001,
    )
    reply_max_bytes: int = setting(
        1024 * 1024,
        "Largest reply a worker sends; a larger one is cut to an error that says so.",
        minimum=1024,
    )
    revokes_max: int = setting(
        50000,
        "Revoked ids kept, the oldest dropped first (Celery's worker_revokes_max).",
        minimum=1,
    )
    revoke_expires: float = setting(
        10800.0,
        "Seconds a revoke holds (Celery's worker_revoke_expires).",
        minimum=1,
    )
    revokes_file: str | None = setting(
        None,
        "File that keeps revoked ids across restarts, shared by the workers of this machine; "
        "default revoked.json in MILLPOND_HOME; 'none' keeps them in memory only.",
    )
    hello_revokes_max: int = setting(
        10000,
        "Most revoked ids sent in one hello (the start-up sync between workers): Celery sends "
        "them all, which breaks large fleets.",
        minimum=0,
    )
    mingle: bool = setting(
        True,
        "At start, ask the running workers for their revoked ids (Celery's mingle).",
    )
    mingle_peers: int = setting(
        3,
        "How many running workers a starting one asks for their revoked ids (it pings all, then"
        " says hello to this many, at random).",
        minimum=1,
    )
    mingle_timeout: float = setting(
        1.0,
        "Seconds a starting worker waits for hello replies.",
        minimum=0.01,
    )

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> ControlSettings:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


SECTION = Section("control", "Remote control and revoke", declared(ControlSettings))
