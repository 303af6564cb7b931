"""The `millpond` command: worker, send, result, purge, plugins, config.

Flags mirror the ones Celery users type (-A, -P, -c, -Q, -l). Exit codes: 0 success, 1 a task or
operation failed (or a cold shutdown), 2 a usage, settings or plugin error (with a message that says
what to do).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from millpond.exceptions import ConfigurationError, MillpondError, PluginLoadError, PluginNotFound

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def load_app(spec: str | None) -> Any:
    """Import `module:attribute` (or `module`, finding its Millpond instance) from the cwd."""
    from millpond.app import Millpond

    if not spec:
        raise ConfigurationError(
            "no app given: pass -A module:attribute (or set MILLPOND_APP), e.g. -A shop.tasks:app"
        )
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millpond", description="millpond task worker")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, app_required: bool = False) -> None:
        p.add_argument("-A", "--app", help="the app, as module:attribute (MILLPOND_APP)")
        p.add_argument("-b", "--broker", dest="broker_url", help="broker URL (MILLPOND_BROKER_URL)")
        p.add_argument("--result-backend", help="result backend URL (MILLPOND_RESULT_BACKEND)")

    w = sub.add_parser("worker", help="run a worker")
    common(w)
    w.add_argument("-P", "--pool", help="execution pool: solo, threads, prefork, gevent, ...")
    w.add_argument("-c", "--concurrency", type=int, help="jobs run at once")
    w.add_argument("-Q", "--queues", help="comma-separated queues to consume")
    w.add_argument(
        "-l", "--loglevel", dest="log_level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR"
    )
    w.add_argument("--log-format", choices=("auto", "json", "console"))
    w.add_argument("-n", "--name", dest="worker_name", help="worker name in logs and spans")
    w.add_argument("--prefetch-multiplier", type=int)
    w.add_argument("--time-limit", type=float, help="default hard time limit (seconds)")
    w.add_argument("--soft-time-limit", type=float, help="default soft time limit (seconds)")
    w.add_argument("--shutdown-timeout", type=float, help="seconds a warm shutdown may take")
    w.add_argument("--max-deliveries", type=int, help="redelivery cap before dead-lettering")
    w.add_argument(
        "--health-port",
        type=int,
        help="serve /livez and /readyz on this port (MILLPOND_HEALTH_PORT)",
    )
    w.add_argument("--no-banner", action="store_true", help="do not print the start-up banner")

    s = sub.add_parser("send", help="send a task by name")
    common(s)
    s.add_argument("task", help="the task's registered name")
    s.add_argument("args", nargs="*", help="positional arguments (JSON values, else strings)")
    s.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    s.add_argument("-Q", "--queue", help="queue to send to")
    s.add_argument("--countdown", type=float, help="run no sooner than N seconds from now")
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

    d = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered messages")
    common(d)
    d.add_argument("action", choices=("list", "replay", "purge"))
    d.add_argument("-Q", "--queues", help="comma-separated queues (default: the configured ones)")
    d.add_argument("--limit", type=int, help="at most this many messages (list: default 20)")
    d.add_argument("-f", "--force", action="store_true", help="purge without asking")

    sub.add_parser("plugins", help="list installed pools, brokers and result backends")

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
    return parser


def _flags(ns: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None}


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from millpond.plugins import core_version

        print(f"millpond {core_version()}")
        return EXIT_OK
    if not ns.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(COMMANDS[ns.command](ns))
    except (ConfigurationError, PluginNotFound, PluginLoadError) as exc:
        print(f"millpond: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MillpondError as exc:
        print(f"millpond: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _settings(ns: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    from millpond.settings import load_settings

    flags = _flags(ns, "app", "broker_url", "result_backend")
    flags.update(extra or {})
    return load_settings(flags)


def cmd_worker(ns: argparse.Namespace) -> int:
    from millpond import logs
    from millpond.settings import load_settings

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
        "health_port",
    )
    if ns.queues:
        flags["queues"] = ns.queues
    settings = load_settings(flags)
    logs.configure(settings.log_level, settings.log_format, stdlib=settings.log_stdlib)
    log = logs.get_logger("millpond.worker")
    for warning in settings.warnings:
        log.warning(warning)
    from millpond import observability

    observability.configure_worker(settings)
    app = load_app(settings.app)
    from millpond.worker import Worker

    worker = Worker(app, settings=settings)
    if not ns.no_banner:
        print(worker.banner(), flush=True)
    try:
        return worker.run()
    finally:
        observability.shutdown()


def cmd_send(ns: argparse.Namespace) -> int:
    from millpond.app import Millpond

    settings = _settings(ns)
    app = load_app(settings.app) if settings.app else Millpond("cli", settings=settings)
    if settings.app:
        app.configure(settings)
    try:
        kwargs = json.loads(ns.kwargs)
    except ValueError as exc:
        raise ConfigurationError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ConfigurationError("--kwargs must be a JSON object, e.g. '{\"x\": 1}'")
    from millpond import observability

    observability.configure_tracing("millpond-send")  # a `publish` span when OTEL_* ask for one
    try:
        result = app.send_task(
            ns.task,
            [_parse_arg(a) for a in ns.args],
            kwargs,
            queue=ns.queue,
            countdown=ns.countdown,
        )
    finally:
        observability.flush()
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
    from millpond.app import Millpond

    app = Millpond("cli", settings=_settings(ns))
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


def cmd_purge(ns: argparse.Namespace) -> int:
    from millpond.app import Millpond

    settings = _settings(ns)
    queues = [q.strip() for q in ns.queues.split(",")] if ns.queues else list(settings.queues)
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


def cmd_dlq(ns: argparse.Namespace) -> int:
    from millpond.app import Millpond
    from millpond.broker import dead_letter_queue
    from millpond.protocol import DEATH_REASON

    settings = _settings(ns)
    queues = [q.strip() for q in ns.queues.split(",")] if ns.queues else list(settings.queues)
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
    from millpond.plugins import BACKENDS, BROKERS, POOLS, describe_installed

    rows = describe_installed()
    titles = {POOLS: "pools", BROKERS: "brokers", BACKENDS: "result backends"}
    for group, title in titles.items():
        mine = [r for r in rows if r.group == group]
        print(f"{title}:")
        if not mine:
            hint = " (pip install millpond-pool-threads, for example)" if group == POOLS else ""
            print(f"  none installed{hint}")
        for r in mine:
            status = "ok" if r.loads else f"FAILS TO LOAD: {r.error}"
            print(f"  {r.name:<16} {r.distribution} {r.version:<10} {status}")
    return EXIT_OK


def cmd_config(ns: argparse.Namespace) -> int:
    from millpond.settings import describe, plugin_sections

    if ns.docs:
        from millpond.settings_docs import render

        sys.stdout.write(render())
        return EXIT_OK
    settings = _settings(ns)
    rows = describe(settings, plugin_sections())
    width = max(len(r[0]) for r in rows)
    for name, env, value, source in rows:
        print(f"{name:<{width}}  {value!s:<30}  {source:<28}  {env}")
    return EXIT_OK


def cmd_new_pool(ns: argparse.Namespace) -> int:
    from millpond.scaffold import create_pool

    created = create_pool(ns.name, ns.dir)
    print(created.summary())
    return EXIT_OK


COMMANDS = {
    "worker": cmd_worker,
    "send": cmd_send,
    "result": cmd_result,
    "purge": cmd_purge,
    "dlq": cmd_dlq,
    "plugins": cmd_plugins,
    "config": cmd_config,
    "new-pool": cmd_new_pool,
}
