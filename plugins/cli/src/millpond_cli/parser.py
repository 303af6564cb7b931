"""The `millpond` command line: every subcommand and flag, in one place.

The commands read it to run, and the settings reference reads it to list which `worker` flag sets
which setting, so it sits below both.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_common(p: argparse.ArgumentParser) -> None:
    """The flags every command that loads the app takes (plugin commands get them too)."""
    p.add_argument("-A", "--app", help="the app, as module:attribute (MILLPOND_APP)")
    p.add_argument("-b", "--broker", dest="broker_url", help="broker URL (MILLPOND_BROKER_URL)")
    p.add_argument("--result-backend", help="result backend URL (MILLPOND_RESULT_BACKEND)")


def _log_level(text: str) -> str:
    """A log level as the setting takes it: upper case, Celery's FATAL as CRITICAL."""
    level = text.upper()
    return "CRITICAL" if level == "FATAL" else level


def _pool(text: str) -> str:
    """A pool's name; Celery's alias `processes` is `prefork`."""
    return "prefork" if text == "processes" else text


def _concurrency(text: str) -> int:
    """A whole number; Celery's `auto` is refused with what to use."""
    try:
        return int(text)
    except ValueError:
        hint = (
            "Celery's -c auto is not taken: leave -c out for the pool's default (prefork: the "
            "CPU count) or give a number"
            if text == "auto"
            else "give a whole number"
        )
        raise argparse.ArgumentTypeError(f"{text!r}: {hint}") from None


def _prefetch_multiplier(text: str) -> int:
    """A whole number; Celery's 0 (no limit) is refused with what to use."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number") from None
    if value == 0:
        raise argparse.ArgumentTypeError(
            "0: Celery's 0 (no prefetch limit) is not taken: a worker holds at most concurrency "
            "x prefetch_multiplier messages; give a number, e.g. 4 (the default)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millpond", description="millpond task worker")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = add_common

    w = sub.add_parser("worker", help="run a worker")
    common(w)
    w.add_argument(
        "-P",
        "--pool",
        type=_pool,
        help="execution pool: solo, threads, prefork (Celery's processes), gevent, ...",
    )
    w.add_argument("-c", "--concurrency", type=_concurrency, help="jobs run at once")
    w.add_argument("-Q", "--queues", help="comma-separated queues to consume")
    w.add_argument(
        "-l",
        "--loglevel",
        dest="log_level",
        type=_log_level,
        help="DEBUG, INFO, WARNING, ERROR, CRITICAL (Celery's FATAL is CRITICAL)",
    )
    w.add_argument("--log-format", choices=("auto", "json", "console"))
    w.add_argument(
        "-n",
        "--name",
        "--hostname",
        dest="worker_name",
        help="worker name in logs, spans and remote control; as Celery's: %%h, %%n and %%d are "
        "the host name, its first label and its domain, and a name without @ gets celery@",
    )
    w.add_argument(
        "--prefetch-multiplier",
        type=_prefetch_multiplier,
        help="messages held per unit of concurrency (at least 1)",
    )
    w.add_argument(
        "-O",
        "--optimization",
        choices=("default", "fair"),
        help="fair: a prefork child is sent a job only when idle (prefork.prefetch_per_child = "
        "1); the other pools take jobs only into free slots already",
    )
    w.add_argument(
        "--max-tasks-per-child",
        dest="prefork.max_tasks_per_child",
        metavar="N",
        type=int,
        help="replace a prefork child after N tasks (MILLPOND_PREFORK__MAX_TASKS_PER_CHILD)",
    )
    w.add_argument(
        "--max-memory-per-child",
        dest="max_memory_per_child_kib",
        metavar="KIB",
        type=int,
        help="replace a prefork child past this resident memory, in KiB as Celery's flag "
        "(the setting prefork.max_memory_per_child is in MiB)",
    )
    w.add_argument(
        "--without-mingle",
        dest="control.mingle",
        action="store_false",
        default=None,
        help="do not ask running workers for their revoked ids at start (MILLPOND_CONTROL__MINGLE)",
    )
    w.add_argument(
        "--without-gossip",
        action="store_true",
        help="accepted from Celery's command lines: millpond workers do not gossip",
    )
    w.add_argument(
        "--heartbeat-interval",
        dest="events.heartbeat_interval",
        metavar="SECONDS",
        type=float,
        help="seconds between worker-heartbeat events (MILLPOND_EVENTS__HEARTBEAT_INTERVAL)",
    )
    w.add_argument("--time-limit", type=float, help="default hard time limit (seconds)")
    w.add_argument("--soft-time-limit", type=float, help="default soft time limit (seconds)")
    w.add_argument("--shutdown-timeout", type=float, help="seconds a warm shutdown may take")
    w.add_argument("--max-deliveries", type=int, help="redelivery cap before dead-lettering")
    w.add_argument(
        "--health-port",
        dest="health.port",  # the [health] section's (millpond-health)
        metavar="PORT",
        type=int,
        help="serve /livez and /readyz on this port (MILLPOND_HEALTH__PORT; millpond-health)",
    )
    w.add_argument(
        "-E",
        "--task-events",
        "--events",
        action="store_true",
        default=None,
        help="send task events for monitors such as Flower from the start (MILLPOND_EVENTS__TASKS)",
    )
    w.add_argument("--no-banner", action="store_true", help="do not print the start-up banner")
    w.add_argument(
        "-B",
        "--beat",
        action="store_true",
        help="also run the periodic task scheduler in this worker (needs millpond-beat)",
    )

    s = sub.add_parser("send", help="send a task by name")
    common(s)
    s.add_argument("task", help="the task's registered name")
    s.add_argument("args", nargs="*", help="positional arguments (JSON values, else strings)")
    s.add_argument(
        "-a",
        "--args",
        dest="json_args",
        metavar="JSON",
        help="positional arguments as a JSON array, as `celery call --args` takes them",
    )
    s.add_argument("-k", "--kwargs", default="{}", help="keyword arguments as a JSON object")
    s.add_argument("-Q", "--queue", help="queue to send to")
    s.add_argument("--countdown", type=float, help="run no sooner than N seconds from now")
    s.add_argument(
        "--eta", metavar="ISO8601", help="run no sooner than this time (UTC when it has no offset)"
    )
    s.add_argument(
        "--expires",
        metavar="SECONDS|ISO8601",
        help="discard the task if it has not started by then (seconds from now, or a time)",
    )
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits")

    r = sub.add_parser("result", help="show a task's state and result")
    common(r)
    r.add_argument("id", help="task id")
    r.add_argument("--wait", action="store_true", help="wait until it is ready")
    r.add_argument("--timeout", type=float, default=60.0)

    pu = sub.add_parser("purge", help="delete every waiting message in queues")
    common(pu)
    pu.add_argument("-Q", "--queues", help="comma-separated queues (default: the configured ones)")
    pu.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")

    qs = sub.add_parser(
        "queue-stats", help="ready, delayed and reserved messages and consumers per queue"
    )
    common(qs)
    qs.add_argument("-Q", "--queues", help="comma-separated queues (default: the configured ones)")
    qs.add_argument("--json", action="store_true", help="one JSON object per queue and line")
    qs.add_argument(
        "--slots",
        type=int,
        help="worker slots serving the queues (workers x concurrency): adds load = "
        "(ready + reserved) / slots",
    )

    d = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered messages")
    common(d)
    d.add_argument("action", choices=("list", "replay", "purge"))
    d.add_argument("-Q", "--queues", help="comma-separated queues (default: the configured ones)")
    d.add_argument("--limit", type=int, help="at most this many messages (list: default 20)")
    d.add_argument("-f", "--force", action="store_true", help="purge without asking")

    pl = sub.add_parser(
        "plugins", help="list installed plugins (pools, brokers, backends, hooks, settings)"
    )
    pl.add_argument(
        "--check", action="store_true", help="import each plugin and report what fails to load"
    )

    c = sub.add_parser("config", help="print every setting, its value and where it came from")
    common(c)
    c.add_argument(
        "--docs",
        action="store_true",
        help="print the settings reference (docs/settings.md) as Markdown instead",
    )

    n = sub.add_parser("new-pool", help="create a pool plugin package from the template")
    n.add_argument("name", help="the pool's name (what users type after --pool), e.g. trio")
    n.add_argument("--dir", default=".", help="where to create millpond-pool-NAME/ (default: .)")
    _plugin_commands(sub)
    return parser


def _plugin_commands(sub: Any) -> None:
    """Subcommands installed plugins add (`millpond.commands`): listed from metadata, and only
    the one being run is imported (its full parser is built when it runs)."""
    from millpond.config import plugins

    for ep in plugins.entry_points(plugins.COMMANDS):
        if ep.name in sub.choices:
            continue  # a plugin cannot replace a core command
        # no distribution lookup here: it would read package metadata at every start-up
        package = ep.value.partition(":")[0].partition(".")[0]
        p = sub.add_parser(ep.name, help=f"(from {package}; millpond {ep.name} -h)", add_help=False)
        p.set_defaults(plugin_command=ep.name)
        add_common(p)
