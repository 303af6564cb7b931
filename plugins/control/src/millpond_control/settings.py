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

from millpond.config.options import Option, Section

COMMAND_SETS = ("all", "safe")
UNSIGNED = ("safe", "refuse")

SECTION = Section(
    "control",
    "Remote control and revoke",
    (
        Option(
            "enabled",
            "bool",
            True,
            "Answer remote control (celery inspect/control, millpond inspect/control, Flower's "
            "buttons) on this worker. Off: no pidbox queue at all; revokes still hold through "
            "the revoked file and hello from other workers.",
        ),
        Option(
            "commands",
            "str",
            "all",
            "Which commands the worker obeys: all, or safe (read-only inspect commands only).",
            choices=COMMAND_SETS,
        ),
        Option(
            "deny",
            "list",
            [],
            "Command names this worker refuses whatever `commands` says (e.g. ['shutdown']).",
        ),
        Option(
            "unsigned",
            "str",
            "safe",
            "With signing_key set, what an unsigned request may do: safe (read-only inspect "
            "commands; Celery clients and Flower cannot sign) or refuse (nothing).",
            choices=UNSIGNED,
        ),
        Option(
            "exchange",
            "str",
            "celery",
            "Celery's control_exchange: the pidbox exchange is `<exchange>.pidbox`.",
        ),
        Option(
            "queue_ttl",
            "float",
            300.0,
            "Seconds a request waits in a worker's pidbox queue (Celery's control_queue_ttl).",
            minimum=0.001,
        ),
        Option(
            "queue_expires",
            "float",
            10.0,
            "Seconds a worker's pidbox queue outlives its worker (control_queue_expires).",
            minimum=0.001,
        ),
        Option(
            "queue_exclusive",
            "bool",
            True,
            "Declare the pidbox queue exclusive (Celery's control_queue_exclusive).",
        ),
        Option(
            "reply_ttl",
            "float",
            10.0,
            "Seconds a reply waits for its caller; then it is dropped (on Redis the reply key "
            "expires), so replies nobody reads never pile up.",
            minimum=0.001,
        ),
        Option(
            "reply_max_bytes",
            "int",
            1024 * 1024,
            "Largest reply a worker sends; a larger one is cut to an error that says so.",
            minimum=1024,
        ),
        Option(
            "revokes_max",
            "int",
            50000,
            "Revoked ids kept, the oldest dropped first (Celery's worker_revokes_max).",
            minimum=1,
        ),
        Option(
            "revoke_expires",
            "float",
            10800.0,
            "Seconds a revoke holds (Celery's worker_revoke_expires).",
            minimum=1,
        ),
        Option(
            "revokes_file",
            "str",
            None,
            "File that keeps revoked ids across restarts, shared by the workers of this "
            "machine; default revoked.json in MILLPOND_HOME; 'none' keeps them in memory only.",
            nullable=True,
        ),
        Option(
            "hello_revokes_max",
            "int",
            10000,
            "Most revoked ids sent in one hello (the start-up sync between workers): Celery "
            "sends them all, which breaks large fleets.",
            minimum=0,
        ),
        Option(
            "mingle",
            "bool",
            True,
            "At start, ask the running workers for their revoked ids (Celery's mingle).",
        ),
        Option(
            "mingle_peers",
            "int",
            3,
            "How many running workers a starting one asks for their revoked ids (it pings all, "
            "then says hello to this many, at random).",
            minimum=1,
        ),
        Option(
            "mingle_timeout",
            "float",
            1.0,
            "Seconds a starting worker waits for hello replies.",
            minimum=0.01,
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """`[control]`, read once at start-up."""

    enabled: bool = True
    commands: str = "all"
    deny: tuple[str, ...] = ()
    unsigned: str = "safe"
    exchange: str = "celery"
    queue_ttl: float = 300.0
    queue_expires: float = 10.0
    queue_exclusive: bool = True
    reply_ttl: float = 10.0
    reply_max_bytes: int = 1024 * 1024
    revokes_max: int = 50000
    revoke_expires: float = 10800.0
    revokes_file: str | None = None
    hello_revokes_max: int = 10000
    mingle: bool = True
    mingle_peers: int = 3
    mingle_timeout: float = 1.0

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> ControlSettings:
        given = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "deny" in given:
            given["deny"] = tuple(given["deny"] or ())
        return cls(**given)
