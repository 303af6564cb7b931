"""What a Celery deploy script passes to `celery -A proj worker ...` that millpond has no flag for:
each is refused with what to use instead, never ignored; the global options Celery takes before
the command (`celery -A proj worker`) are moved after it; Celery's `-n` placeholders (%h, %n,
%d) are expanded; the environment variables Celery reads are checked against millpond's settings.

The flags millpond maps (-n/--hostname, -E/--events, -O, --max-tasks-per-child,
--max-memory-per-child, --without-gossip, --without-mingle, --heartbeat-interval) are declared
in `parser`; this module holds only what the parser cannot say.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.config.settings import Settings

_FOREGROUND = (
    "millpond worker runs in the foreground: run it under systemd, supervisord or a container "
    "(docs/deploy.md)"
)
_MANAGER = "set it in the process manager that starts the worker (systemd's User=, Group=, UMask=)"

#: `celery worker` options with no millpond flag -> what to do instead
WORKER_FLAGS: dict[str, str] = {
    "-D": _FOREGROUND,
    "--detach": _FOREGROUND,
    "--pidfile": f"{_FOREGROUND}, which knows its pid",
    "-f": "millpond logs to stderr: redirect it (2>>FILE) or let the process manager collect it",
    "--logfile": "millpond logs to stderr: redirect it (2>>FILE) or let the process manager "
    "collect it",
    "--uid": _MANAGER,
    "--gid": _MANAGER,
    "--umask": _MANAGER,
    "--executable": "start the worker with the interpreter you want (python -m millpond worker)",
    "-S": "revoked ids are kept in millpond-control's revoked file (control.revokes_file, "
    "MILLPOND_CONTROL__REVOKES_FILE)",
    "--statedb": "revoked ids are kept in millpond-control's revoked file "
    "(control.revokes_file, MILLPOND_CONTROL__REVOKES_FILE)",
    "--disable-prefetch": "use --prefetch-multiplier 1 (and -O fair with -P prefork)",
    "--pool-start-method": "the prefork pool always forks: drop it",
    "--purge": "run `millpond purge -Q QUEUES --force` before starting the worker",
    "--discard": "run `millpond purge -Q QUEUES --force` before starting the worker",
    "-X": "name the queues to consume with -Q",
    "--exclude-queues": "name the queues to consume with -Q",
    "-I": "import those modules from the app's module (-A)",
    "--include": "import those modules from the app's module (-A)",
    "--without-heartbeat": "send heartbeats less often with --heartbeat-interval SECONDS, or no "
    "worker events at all with MILLPOND_EVENTS__ENABLED=false",
    "--autoscale": "a worker's concurrency is fixed (-c N): scale the number of workers instead "
    "(`millpond queue-stats --slots` gives an autoscaler the load), or grow and shrink a running "
    "pool with `celery control pool_grow`/`pool_shrink`",
    "-s": "millpond beat keeps its state in the broker, not a schedule file: drop it "
    "(docs/beat.md)",
    "--schedule": "millpond beat keeps its state in the broker, not a schedule file: drop it "
    "(docs/beat.md)",
    "--schedule-filename": "millpond beat keeps its state in the broker, not a schedule file: "
    "drop it (docs/beat.md)",
    "--scheduler": "millpond beat has one scheduler, reading beat_schedule: drop it (docs/beat.md)",
}

_SETTINGS = "millpond reads millpond.toml (MILLPOND_SETTINGS_FILE), MILLPOND_* variables and flags"
#: `celery` global options with no millpond flag (any command) -> what to do instead
GLOBAL_FLAGS: dict[str, str] = {
    "--workdir": "cd to that directory before running millpond",
    "--loader": f"{_SETTINGS}; drop it",
    "--config": f"{_SETTINGS}, not a Celery config module",
    "-C": "use --log-format json for logs without colours",
    "--no-color": "use --log-format json for logs without colours",
    "-q": "use --no-banner (worker) and -l WARNING",
    "--quiet": "use --no-banner (worker) and -l WARNING",
    "--skip-checks": "drop it",
}

#: `celery call` options `millpond send` has no flag for -> what to do instead
SEND_FLAGS: dict[str, str] = {
    "--serializer": "millpond sends JSON (the Celery default): drop it",
    "--exchange": "millpond routes by queue: send with -Q QUEUE",
    "--routing-key": "millpond routes by queue: send with -Q QUEUE",
}

#: `celery purge` options `millpond purge` has no flag for -> what to do instead
PURGE_FLAGS: dict[str, str] = {
    "-X": "name the queues to purge with -Q",
    "--exclude-queues": "name the queues to purge with -Q",
}

#: the options `add_common` gives every command: Celery takes them before the command name
_GLOBAL_WITH_VALUE = ("-A", "--app", "-b", "--broker", "--result-backend")


def hoist_global_options(argv: list[str], commands: set[str]) -> list[str]:
    """`-A proj worker ...` (Celery's order) as `worker -A proj ...`: the common options given
    before the command name are moved after it; Celery's other global options are refused with
    what to use instead; anything else is left for argparse to judge."""
    moved: list[str] = []
    i = 0
    while i < len(argv) and argv[i] not in commands:
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in _GLOBAL_WITH_VALUE and "=" in arg:
            moved.append(arg)
            i += 1
        elif arg in _GLOBAL_WITH_VALUE and i + 1 < len(argv):
            moved += argv[i : i + 2]
            i += 2
        elif arg[:2] in ("-A", "-b") and len(arg) > 2:
            moved.append(arg)  # -Aproj
            i += 1
        else:
            refuse_celery_flags(None, [arg])  # Celery's --workdir, --config, ...
            return argv  # not Celery's global options: argparse says what is wrong
    if not moved or i == len(argv):
        return argv
    return [argv[i], *moved, *argv[i + 1 :]]


def refuse_celery_flags(command: str | None, extra: list[str]) -> None:
    """Refuse a Celery option argparse did not know, with what to use instead."""
    own = {"worker": WORKER_FLAGS, "send": SEND_FLAGS, "purge": PURGE_FLAGS}.get(command or "", {})
    known = {**GLOBAL_FLAGS, **own}
    for arg in extra:
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if name in known:
            raise ConfigurationError(
                f"{name} is a Celery option millpond does not take: {known[name]}"
            )


def expand_hostname(name: str, *, flag: bool) -> str:
    """Celery's -n placeholders: %h the host name, %n its first label, %d the rest (the
    domain), %% a percent sign. Given by `flag` (-n/--hostname), a name without `@` is a host, as
    in Celery: `celery@` goes first (`celery inspect -d celery@w1` reaches `-n w1`)."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    out, i = [], 0
    while i < len(name):
        if name[i] == "%" and i + 1 < len(name) and name[i + 1] in "hnd%":
            out.append({"h": host, "n": short, "d": domain, "%": "%"}[name[i + 1]])
            i += 2
        else:
            out.append(name[i])
            i += 1
    expanded = "".join(out)
    return expanded if "@" in expanded or not flag else f"celery@{expanded}"


#: Celery's environment variables -> (the millpond setting they would set, its flag)
_ENV = {
    "CELERY_BROKER_URL": ("broker_url", "-b"),
    "CELERY_BROKER_READ_URL": ("broker_url", "-b"),
    "CELERY_BROKER_WRITE_URL": ("broker_url", "-b"),
    "CELERY_RESULT_BACKEND": ("result_backend", "--result-backend"),
}


#: `celery worker`'s options read from CELERY_WORKER_<OPTION> (click's automatic variables) ->
#: what sets the same in millpond
_WORKER_ENV = {
    "hostname": "MILLPOND_WORKER_NAME or -n",
    "loglevel": "MILLPOND_LOG_LEVEL or -l",
    "prefetch_multiplier": "MILLPOND_PREFETCH_MULTIPLIER or --prefetch-multiplier",
    "concurrency": "MILLPOND_CONCURRENCY or -c",
    "pool": "MILLPOND_POOL or -P",
    "task_events": "MILLPOND_EVENTS__TASKS=true or -E",
    "time_limit": "MILLPOND_TIME_LIMIT or --time-limit",
    "soft_time_limit": "MILLPOND_SOFT_TIME_LIMIT or --soft-time-limit",
    "max_tasks_per_child": "MILLPOND_PREFORK__MAX_TASKS_PER_CHILD or --max-tasks-per-child",
    "max_memory_per_child": "MILLPOND_PREFORK__MAX_MEMORY_PER_CHILD (MiB) or "
    "--max-memory-per-child (KiB)",
    "queues": "MILLPOND_QUEUES or -Q",
    "optimization": "-O fair or MILLPOND_PREFORK__PREFETCH_PER_CHILD=1",
    "without_mingle": "MILLPOND_CONTROL__MINGLE=false or --without-mingle",
    "without_gossip": "nothing: millpond workers do not gossip",
    "heartbeat_interval": "MILLPOND_EVENTS__HEARTBEAT_INTERVAL or --heartbeat-interval",
    "beat": "-B",
}


def check_celery_env(
    settings: Settings, environ: Mapping[str, str] | None = None, *, worker: bool = False
) -> None:
    """Refuse a Celery variable (CELERY_BROKER_URL, ...) whose value millpond would not use: the
    deploy that sets it expects it to count, and millpond reads MILLPOND_* only. One that agrees
    with millpond's setting (both sides configured alike) is fine. A `worker` also refuses
    CELERY_WORKER_<OPTION>, which only `celery worker` reads."""
    from millpond.contracts.broker import mask_url

    env = os.environ if environ is None else environ
    if env.get("CELERY_APP") and not settings.app:
        raise ConfigurationError(
            f"CELERY_APP is set ({env['CELERY_APP']}) but millpond does not read it: pass "
            "-A module:attribute or set MILLPOND_APP (e.g. MILLPOND_APP=shop.tasks:app)"
        )
    for var in sorted(env) if worker else ():
        if not var.startswith("CELERY_WORKER_") or not env[var]:
            continue
        option = var.removeprefix("CELERY_WORKER_").lower()
        refused = WORKER_FLAGS.get("--" + option.replace("_", "-"))
        use = f"use {_WORKER_ENV[option]}" if option in _WORKER_ENV else refused
        raise ConfigurationError(
            f"{var} is set ({env[var]}) but millpond does not read it: "
            f"{use or 'millpond has no such option'}; unset {var} for millpond"
        )
    for var, (name, flag) in _ENV.items():
        given = env.get(var)
        if not given:
            continue
        used = getattr(settings, name)
        if given == used:
            continue
        upper = f"MILLPOND_{name.upper()}"
        where = settings.source(name)
        now = f"{mask_url(used)} ({where})" if used else f"unset ({where})"
        raise ConfigurationError(
            f"{var} is set ({mask_url(given)}) but millpond does not read it: its {name} is {now}; "
            f"set {upper}={mask_url(given)} (or pass {flag}), or unset {var}"
        )
    for var in ("CELERY_CONFIG_MODULE", "CELERY_LOADER"):
        if env.get(var):
            raise ConfigurationError(
                f"{var} is set ({env[var]}) but millpond does not read Celery config modules: "
                f"{_SETTINGS} (`millpond config` shows them); unset {var} for millpond"
            )
