"""The `millpond` command: worker, send, result, purge, dlq, plugins, config, new-pool, and the
commands plugins add (`inspect`, `control` and `events` come with millpond-control, `beat` with
millpond-beat).

Flags mirror the ones Celery users type (-A, -P, -c, -Q, -l, -n, -O, ...; `celery_compat` refuses
the others with what to use instead). Exit codes: 0 success, 1 a task or
operation failed (or a cold shutdown), 2 a usage, settings or plugin error (with a message that says
what to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from millpond import __version__
from millpond.exceptions import (
    ConfigurationError,
    MillpondError,
    NotSupported,
    PluginLoadError,
    PluginNotFound,
)
from millpond_cli import celery_compat
from millpond_cli.command import Command, json_array, json_object
from millpond_cli.parser import build_parser

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.consume.worker import Worker
    from millpond.produce.app import Millpond

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def load_app(spec: str | None) -> Any:
    """Import `module:attribute` (or `module`, finding its Millpond instance) from the cwd."""
    from millpond.produce.app import Millpond

    if not spec:
        raise ConfigurationError(
            "no app given: pass -A module:attribute (or set MILLPOND_APP), e.g. -A shop.tasks:app"
        )
    module_name, colon, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        parent, dot, last = module_name.rpartition(".")
        if exc.name == module_name and dot and not colon:  # Celery's -A proj.tasks.app
            return load_app(f"{parent}:{last}")
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"cannot import app module {module_name!r}: {exc}; run from the directory that "
                "contains it, or add it to PYTHONPATH"
            ) from exc
        raise
    if attr:
        try:
            app = getattr(module, attr)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    else:
        found = [v for v in vars(module).values() if isinstance(v, Millpond)]
        if len(found) != 1:
            raise ConfigurationError(
                f"module {module_name!r} has {len(found)} Millpond apps; name one: -A {module_name}:app"
            )
        app = found[0]
    if not isinstance(app, Millpond):
        raise ConfigurationError(f"{spec} is a {type(app).__name__}, not a Millpond app")
    return app


def _flags(ns: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None}


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _time(flag: str, text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC (Celery's default timezone)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"{flag} {text!r} is not an ISO 8601 time, e.g. 2030-01-31T12:00:00+00:00"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def load_from_args(ns: argparse.Namespace) -> tuple[Settings, Millpond | None]:
    """(settings, app) from the common flags -A, -b, --result-backend (for plugin commands)."""
    return _load(ns)


def _load_command(name: str) -> Command:
    """The installed command `name`, refused with a clear error when it is not a `Command`."""
    from millpond.config import plugins

    command = plugins.load(plugins.COMMANDS, name)
    if not isinstance(command, Command):
        raise PluginLoadError(
            f"the command {name!r} does not name a millpond_cli Command instance: {command!r}"
        )
    return command


def _run_plugin(name: str, argv: list[str]) -> int:
    """Parse the arguments again with the plugin command's full parser, then run it."""
    from millpond_cli.parser import add_common

    command = _load_command(name)
    parser = argparse.ArgumentParser(prog=f"millpond {name}", description=command.help)
    add_common(parser)
    command.add_arguments(parser)
    rest = argv[argv.index(name) + 1 :]
    return int(command.run(parser.parse_args(rest)))


def main(argv: list[str] | None = None, *, patched: str | None = None) -> int:
    """Run one command; `patched` is the pool whose monkey-patch the bootstrap already ran."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = set(_subcommands(parser))
    try:
        argv = celery_compat.hoist_global_options(argv, commands)  # Celery's `-A proj worker`
        ns, extra = parser.parse_known_args(argv)
        celery_compat.refuse_celery_flags(ns.command, extra)
    except ConfigurationError as exc:
        print(f"millpond: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if getattr(ns, "plugin_command", None) is None:
        ns = parser.parse_args(argv)  # the core's commands: unknown arguments are errors
    ns.patched = patched
    if ns.version:
        print(f"millpond {__version__}")
        return EXIT_OK
    if not ns.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        if getattr(ns, "plugin_command", None) is not None:
            return _run_plugin(ns.plugin_command, argv)
        return int(COMMANDS[ns.command](ns))
    except (ConfigurationError, PluginNotFound, PluginLoadError) as exc:
        print(f"millpond: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MillpondError as exc:
        print(f"millpond: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """Every subcommand's name, the plugins' included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _load(ns: argparse.Namespace) -> tuple[Settings, Millpond | None]:
    """(settings, app) for the commands that take -A; the app is None when none is given.

    Values given to `Millpond(...)` in the app's code rank between the file and the environment,
    so they are known only once the app is imported: then every source is read again with them,
    and the app is configured with the result.
    """
    from millpond.config.settings import load_settings

    flags = _flags(ns, "app", "broker_url", "result_backend")
    settings = load_settings(flags)
    check_env = getattr(ns, "command", None) != "config"  # `config` shows a mismatch
    if not settings.app:
        if check_env:
            celery_compat.check_celery_env(settings)
        return settings, None
    app = load_app(settings.app)
    if app.code_config:
        settings = load_settings(flags, code=app.code_config)
    if check_env:
        celery_compat.check_celery_env(settings)
    app.configure(settings)
    return settings, app


def _check_early_patch(settings: Settings, patched: str | None) -> None:
    """Refuse to run a pool whose monkey-patching did not happen before the app was imported."""
    from millpond.config import plugins

    pool = settings.pool
    if pool == patched or (patched is None and pool not in plugins.installed(plugins.PATCHES)):
        return
    where = settings.sources.get("pool", "default")
    if where == "code":
        where = f"code (Millpond(..., pool={pool!r}))"
    how = f'-P {pool}, MILLPOND_POOL={pool} or pool = "{pool}" in millpond.toml'
    if patched is not None:
        raise ConfigurationError(
            f"the interpreter was monkey-patched for the {patched!r} pool, but the worker would "
            f"run the {pool!r} pool (chosen in {where}); choose one pool with {how}"
        )
    raise ConfigurationError(
        f"the {pool!r} pool must monkey-patch the interpreter before the app is imported, but it "
        f"is chosen in {where}, which is read only once the app is imported; choose it with "
        f"{how} instead"
    )


def worker_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings `millpond worker`'s flags give, Celery's flags translated."""
    flags = _flags(
        ns,
        "app",
        "broker_url",
        "result_backend",
        "pool",
        "concurrency",
        "log_level",
        "log_format",
        "worker_name",
        "prefetch_multiplier",
        "time_limit",
        "soft_time_limit",
        "shutdown_timeout",
        "max_deliveries",
        "health.port",
        "prefork.max_tasks_per_child",
        "control.mingle",
        "events.heartbeat_interval",
    )
    if ns.queues:
        flags["queues"] = ns.queues
    if ns.task_events:
        flags["events.tasks"] = True
    if ns.worker_name is not None:
        flags["worker_name"] = celery_compat.expand_hostname(ns.worker_name, flag=True)
    if ns.max_memory_per_child_kib is not None:  # Celery's KiB, the setting's MiB (rounded up)
        flags["prefork.max_memory_per_child"] = -(-ns.max_memory_per_child_kib // 1024)
    if ns.optimization == "fair":
        flags["prefork.prefetch_per_child"] = 1
    return flags


def _check_worker_flags(ns: argparse.Namespace, settings: Settings) -> Settings:
    """Refuse the Celery flags the chosen pool cannot honour; expand %h in a worker name given
    elsewhere than the flag."""
    if settings.pool != "prefork":
        for given, flag in (
            (getattr(ns, "prefork.max_tasks_per_child"), "--max-tasks-per-child"),
            (ns.max_memory_per_child_kib, "--max-memory-per-child"),
        ):
            if given is not None:
                raise ConfigurationError(
                    f"{flag} replaces prefork child processes, and the {settings.pool!r} pool has "
                    "none: run it with -P prefork, or drop the flag"
                )
    name = settings.worker_name
    if name and "%" in name and settings.source("worker_name") != "flag":
        settings = dataclasses.replace(
            settings, worker_name=celery_compat.expand_hostname(name, flag=False)
        )
    return settings


def cmd_worker(ns: argparse.Namespace) -> int:
    import structlog

    from millpond.config import plugins
    from millpond.config.settings import load_settings
    from millpond.contracts.hooks import HookChain
    from millpond_cli import logs

    flags = worker_flags(ns)
    settings = load_settings(flags)
    # the root logger is adopted only after the app is imported: one the app configured stays its
    logs.configure(settings.log_level, settings.log_format, stdlib=False)
    # before the app is imported: the tracing hooks install a provider from OTEL_* here, so the
    # app module can add span processors to it; with no OTEL_* set the app may install its own
    chosen, installed = settings.hooks, plugins.load_hooks(settings.hooks)
    HookChain(installed).process_starting("millpond-worker")
    app = load_app(settings.app)
    if app.code_config:
        # the app's own settings rank between the file and the environment
        settings = load_settings(flags, code=app.code_config)
    if settings.hooks == chosen:  # the app's own settings did not choose other hooks
        app.use_hooks(installed)
    logs.configure(settings.log_level, settings.log_format, stdlib=settings.log_stdlib)
    _check_early_patch(settings, ns.patched)
    celery_compat.check_celery_env(settings, worker=True)
    settings = _check_worker_flags(ns, settings)
    log = structlog.get_logger("millpond.worker")
    for warning in settings.warnings:
        log.warning(warning)
    from millpond.consume.worker import Worker

    stop_beat = None
    if ns.beat:  # before the worker reads the app's hooks: the scheduler starts once it is ready
        stop_beat = _load_command("beat").embed(app, settings)
    worker = Worker(app, settings=settings)
    if not ns.no_banner:
        print(banner(worker), flush=True)
    _freeze_start_up_objects()
    try:
        return worker.run()
    finally:
        if stop_beat is not None:
            stop_beat()


def banner(worker: Worker) -> str:
    """What the worker runs, from where and how, printed as it starts."""
    from millpond.contracts.broker import mask_url

    app, settings, tasks = worker.app, worker.settings, sorted(worker.app.tasks)
    results = mask_url(settings.result_backend) or (
        "(kept by the broker)"
        if app.backend is not None
        else "(none: this broker keeps no results; set result_backend to store them)"
    )
    lines = [
        f"millpond {__version__} worker {worker.name}",
        f"  app:         {app.name}",
        f"  broker:      {mask_url(app.broker_url)}",
        f"  results:     {results}",
        f"  pool:        {settings.pool} (concurrency {worker.concurrency}, "
        f"prefetch {worker.prefetch})",
        f"  queues:      {', '.join(worker.queues)}",
    ]
    lines += [f"  {line}" for hook in worker.hooks.hooks if (line := hook.describe_worker(worker))]
    lines.append(f"  tasks ({len(tasks)}):")
    notes = worker.components.values()  # a rate limit, for instance
    lines += [f"    . {name}{''.join(c.describe_task(name) for c in notes)}" for name in tasks]
    return "\n".join(lines)


def _freeze_start_up_objects() -> None:
    """Move everything start-up made (modules, classes, settings) out of the garbage collector's
    sight before the worker runs.

    Those objects live as long as the process, yet every full collection would walk all of them
    again (tens of thousands: one full pass costs 10-20 ms, and where one falls during start-up
    depends only on how many objects start-up allocated). Frozen, they are never walked, and a
    forked pool's children do not copy the pages the collector would have touched. The young
    generations are collected first, so the short-lived garbage of start-up is not kept.
    """
    import gc

    gc.collect(1)
    gc.freeze()


def cmd_send(ns: argparse.Namespace) -> int:
    from millpond.produce.app import Millpond

    settings, app = _load(ns)
    if app is None:
        app = Millpond("cli", settings=settings)
    kwargs = json_object("--kwargs", ns.kwargs, '{"x": 1}')
    args = [_parse_arg(a) for a in ns.args]
    if ns.json_args is not None:
        if args:
            raise ConfigurationError("give the arguments positionally or as --args, not both")
        args = json_array("--args", ns.json_args, "[1, 2]")
    when: dict[str, Any] = {}
    if ns.eta is not None:
        if ns.countdown is not None:
            raise ConfigurationError("give --countdown or --eta, not both")
        when["eta"] = _time("--eta", ns.eta)
    if ns.expires is not None:
        try:
            when["expires"] = float(ns.expires)
        except ValueError:
            when["expires"] = _time("--expires", ns.expires)
    hooks = app.hooks
    hooks.process_starting("millpond-send")  # a `publish` span when OTEL_* ask
    try:
        result = app.send_task(
            ns.task,
            args,
            kwargs,
            queue=ns.queue,
            countdown=ns.countdown,
            **when,
            # rpc://: only this process could read the result, and without --wait it is gone
            reply_to=None if ns.wait else "",
        )
    finally:
        hooks.process_exiting()  # the `publish` span out before the process ends
    print(result.id, flush=True)
    if not ns.wait:
        return EXIT_OK
    try:
        value = result.get(timeout=ns.timeout)
    except MillpondError:
        raise
    except Exception as exc:
        print(f"task failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        app.close()
    print(json.dumps(value))
    return EXIT_OK


def cmd_result(ns: argparse.Namespace) -> int:
    from millpond.produce.app import Millpond

    settings, _app = _load(ns)
    app = Millpond("cli", settings=settings)
    handle = app.AsyncResult(ns.id)
    try:
        if ns.wait:
            handle.get(timeout=ns.timeout, propagate=False)
        meta = app.backend.peek(ns.id) if app.backend else None
    finally:
        app.close()
    if meta is None:
        print(json.dumps({"task_id": ns.id, "status": "PENDING"}))
        return EXIT_OK
    print(json.dumps(meta.to_json(), indent=2))
    return EXIT_FAILED if meta.status == "FAILURE" else EXIT_OK


def _queues(ns: argparse.Namespace, settings: Settings) -> list[str]:
    """The queues a queue command works on: `--queues a,b`, else the ones the worker consumes.

    A `-Q` given empty (an unset variable in a script) is not "the configured queues", and every
    name is checked before the command touches any queue (`purge` deletes).
    """
    if ns.queues is None:
        return list(settings.queues)
    queues = [q.strip() for q in ns.queues.split(",")]
    if not all(queues):
        raise ConfigurationError(
            f"-Q {ns.queues!r} has an empty queue name: pass comma-separated names, e.g. "
            "-Q emails,images, or leave -Q out for the configured queues"
        )
    return queues


def cmd_purge(ns: argparse.Namespace) -> int:
    from millpond.produce.app import Millpond

    settings, _app = _load(ns)
    queues = _queues(ns, settings)
    if not ns.force:
        if not sys.stdin.isatty():
            raise ConfigurationError("purge deletes messages: pass --force to confirm")
        answer = input(f"Delete every waiting message in {', '.join(queues)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return EXIT_OK
    app = Millpond("cli", settings=settings)
    try:
        for queue in queues:
            print(f"{queue}: {app.broker.purge(queue)} messages purged")
    finally:
        app.close()
    return EXIT_OK


def cmd_queue_stats(ns: argparse.Namespace) -> int:
    """What the broker says about each queue, for scripts and autoscalers (`--json`)."""
    from millpond.produce.app import Millpond

    settings, _app = _load(ns)
    queues = _queues(ns, settings)
    if ns.slots is not None and ns.slots < 1:
        raise ConfigurationError(f"--slots must be at least 1, got {ns.slots}")
    app = Millpond("cli", settings=settings)
    try:
        for queue in queues:
            try:
                stats = dataclasses.asdict(app.broker.queue_stats(queue))
            except NotSupported as exc:
                raise ConfigurationError(f"queue-stats: {exc}") from None
            if ns.slots is not None:
                backlog = stats["ready"] + (stats["reserved"] or 0)
                stats["load"] = round(backlog / ns.slots, 3)
            if ns.json:
                print(json.dumps(stats), flush=True)
                continue
            shown = ", ".join(
                f"{k} {'unknown' if v is None else v}" for k, v in stats.items() if k != "queue"
            )
            print(f"{queue}: {shown}", flush=True)
    finally:
        app.close()
    return EXIT_OK


def cmd_dlq(ns: argparse.Namespace) -> int:
    from millpond.contracts.broker import dead_letter_queue
    from millpond.produce.app import Millpond
    from millpond.wire.protocol import DEATH_REASON

    settings, _app = _load(ns)
    queues = _queues(ns, settings)
    if ns.limit is not None and ns.limit < 1:
        raise ConfigurationError(f"--limit must be at least 1, got {ns.limit}")
    if ns.action == "purge" and ns.limit is not None:
        raise ConfigurationError(
            "dlq purge deletes every dead letter of the queue: --limit applies to list and "
            "replay only; leave it out to purge them all"
        )
    app = Millpond("cli", settings=settings)
    try:
        for queue in queues:
            dead = dead_letter_queue(queue)
            if ns.action == "list":
                messages = app.broker.dead_letters(queue, ns.limit or 20)
                print(f"{dead}: {len(messages)} shown")
                for m in messages:
                    print(
                        json.dumps(
                            {
                                "id": m.headers.get("id"),
                                "task": m.headers.get("task"),
                                "reason": m.headers.get(DEATH_REASON),
                                "argsrepr": m.headers.get("argsrepr"),
                            }
                        )
                    )
            elif ns.action == "replay":
                moved = app.broker.replay_dead_letters(queue, ns.limit)
                print(f"{dead}: {moved} messages moved back to {queue}")
            else:
                if not ns.force:
                    raise ConfigurationError("dlq purge deletes messages: pass --force to confirm")
                print(f"{dead}: {app.broker.purge(dead)} messages purged")
    finally:
        app.close()
    return EXIT_OK


def cmd_plugins(ns: argparse.Namespace) -> int:
    """Every installed plugin from its metadata alone (nothing is imported, so listing a green
    pool does not import gevent); with --check each is imported and checked, and the exit code
    is 1 when one fails."""
    from millpond.config import plugins

    lines: list[tuple[str, ...]] = [("NAME", "DISTRIBUTION", "VERSION", "CORE VERSIONS")]
    failed = 0
    for group in plugins.GROUPS:
        lines.append((f"{plugins.GROUPS[group].title}:",))
        mine = [plugins.describe(ep) for ep in plugins.entry_points(group)]
        if not mine:
            hint = (
                " (pip install millpond-pool-threads, for example)"
                if group == plugins.POOLS
                else ""
            )
            lines.append((f"  none installed{hint}",))
        for r in mine:
            cells: tuple[str, ...] = (f"  {r.name}", r.distribution, r.version, r.core_range or "-")
            if ns.check:
                error = _load_error(r.group, r.name)
                failed += error is not None
                cells += ("ok" if error is None else f"FAILS TO LOAD: {error}",)
            lines.append(cells)
    widths = [max(len(line[i]) for line in lines if len(line) > 1) for i in range(4)]
    for line in lines:
        if len(line) == 1:  # a group's title, or "none installed"
            print(line[0])
        else:
            padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            print("  ".join([*padded, *line[4:]]).rstrip())
    return EXIT_FAILED if failed else EXIT_OK


def _load_error(group: str, name: str) -> str | None:
    """Import one plugin and check it: None when it loads, else why it does not."""
    from millpond.config import plugins

    try:
        plugins.load(group, name)
    except MillpondError as exc:
        return str(exc)
    except Exception as exc:  # stevedore lets an AssertionError raised on import through
        return f"{type(exc).__name__}: {exc}"
    return None


def cmd_config(ns: argparse.Namespace) -> int:
    from millpond_cli.settings_docs import describe, installed_sections, render

    if ns.docs:
        sys.stdout.write(render())
        return EXIT_OK
    settings, _app = _load(ns)
    rows = describe(settings, [d.section for d in installed_sections() if d.section.name])
    width = max(len(r[0]) for r in rows)
    for name, env, value, source in rows:
        print(f"{name:<{width}}  {value!s:<30}  {source:<32}  {env}")
    for warning in settings.warnings:  # what the worker would log at start-up
        print(f"millpond: warning: {warning}", file=sys.stderr)
    try:
        celery_compat.check_celery_env(settings)
    except ConfigurationError as exc:  # what other commands refuse
        print(f"millpond: warning: {exc}", file=sys.stderr)
    return EXIT_OK


def cmd_new_pool(ns: argparse.Namespace) -> int:
    from millpond_cli.scaffold import create_pool

    created = create_pool(ns.name, ns.dir)
    print(created.summary())
    return EXIT_OK


COMMANDS = {
    "worker": cmd_worker,
    "send": cmd_send,
    "result": cmd_result,
    "purge": cmd_purge,
    "queue-stats": cmd_queue_stats,
    "dlq": cmd_dlq,
    "plugins": cmd_plugins,
    "config": cmd_config,
    "new-pool": cmd_new_pool,
}
