"""`millpond inspect`, `millpond control` and `millpond events`: Celery's remote control and event
stream, with no Celery installed (`millpond.commands` entry points of millpond-control).

They speak kombu's pidbox (see `millpond_control.client`), so they reach millpond and Celery
workers alike, and print what `celery inspect`/`celery control` print: one `->  node: OK` block
per worker that answered, the reply indented under it (or `{node: reply}` as JSON with --json).
Arguments after the command are the command's own, typed as its registration declares
(`millpond control rate_limit tasks.add 10/m`, `millpond control revoke ID [ID ...]`); keyword
arguments Celery's CLI has no place for go in `--args '{"terminate": true}'`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from millpond.exceptions import ConfigurationError
from millpond_cli.command import Command as CoreCommand
from millpond_cli.command import json_object
from millpond_control import commands as _builtin  # noqa: F401 - registers them
from millpond_control import ratelimit as _rate_limit  # noqa: F401 - registers it
from millpond_control.registry import COMMANDS, Command

if TYPE_CHECKING:
    from millpond.config.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _typed(cmd: Command, given: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rest = list(given)
    for name, kind in cmd.args:
        if not rest:
            break
        value = rest.pop(0)
        try:
            out[name] = _cast(kind, value)
        except ValueError:
            raise ConfigurationError(f"{cmd.name}: {name} must be {kind.__name__}, got {value!r}")
    if rest:
        if not cmd.variadic:
            raise ConfigurationError(
                f"{cmd.name} takes {len(cmd.args)} argument(s) "
                f"({', '.join(n for n, _ in cmd.args) or 'none'}), got {len(given)}"
            )
        out[cmd.variadic] = rest
    return out


def _cast(kind: type, value: str) -> Any:
    if kind is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return kind(value)


def _show(replies: list[dict[str, Any]], as_json: bool) -> None:
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    if as_json:
        print(json.dumps(merged, indent=None, default=str))
        return
    for node, answer in sorted(merged.items()):
        status = "OK"
        if isinstance(answer, dict) and set(answer) == {"error"}:
            status = "ERROR"
        print(f"->  {node}: {status}")
        text = _text(answer)
        for line in text.splitlines() or [""]:
            print(f"        {line}")
    if not as_json:
        count = len(merged)
        print(f"\n{count} node{'s' if count != 1 else ''} online." if count else "")


def _text(answer: Any) -> str:
    if isinstance(answer, dict) and len(answer) == 1 and ("ok" in answer or "error" in answer):
        value = next(iter(answer.values()))
        return value if isinstance(value, str) else json.dumps(value, indent=4, default=str)
    if isinstance(answer, list):
        return "\n".join(
            f"* {item if isinstance(item, str) else json.dumps(item, default=str)}"
            for item in answer
        )
    return json.dumps(answer, indent=4, sort_keys=True, default=str)


def cmd_remote(
    ns: argparse.Namespace, kind: str, load: Callable[[argparse.Namespace], tuple[Settings, Any]]
) -> int:
    """One inspect/control call: send, collect for --timeout, print. `load` reads the settings
    (and the app, for its code settings) the way every command does."""
    if ns.method == "help":
        for listed in COMMANDS:
            if listed.kind == kind:
                args = " ".join(f"<{n}>" for n, _ in listed.args)
                more = f" [{listed.variadic} ...]" if listed.variadic else ""
                print(f"{listed.name} {args}{more}".rstrip().ljust(40) + f" {listed.help}")
        return EXIT_OK
    cmd = COMMANDS.get(ns.method)
    if cmd is None or cmd.kind != kind:
        names = ", ".join(c.name for c in COMMANDS if c.kind == kind)
        raise ConfigurationError(f"no {kind} command {ns.method!r}; the {kind} commands: {names}")
    extra = json_object("--args", ns.args, '{"terminate": true}')
    arguments = {**_typed(cmd, ns.arguments), **extra}
    if kind == "control" and getattr(ns, "terminate", False):
        arguments["terminate"] = True
    if kind == "control" and getattr(ns, "signal", None):
        arguments["signal"] = ns.signal
    from millpond.produce.app import Millpond
    from millpond_control.client import Mailbox
    from millpond_control.settings import SECTION, ControlSettings

    settings, _app = load(ns)
    control = ControlSettings.from_section(settings.section(SECTION))
    app = Millpond("cli", settings=settings)
    mailbox = Mailbox(app.broker, namespace=control.exchange, signing_key=settings.signing_key)
    destination = [d.strip() for d in ns.destination.split(",")] if ns.destination else None
    try:
        replies = mailbox.call(
            cmd.name,
            arguments,
            destination=destination,
            pattern=ns.pattern,
            matcher="glob" if ns.pattern else None,
            timeout=ns.timeout,
        )
    finally:
        mailbox.close()
        app.close()
    if not replies:
        print("Error: No nodes replied within time constraint", file=sys.stderr)
        return EXIT_FAILED
    _show(replies, ns.json)
    failed = any(
        isinstance(answer, dict) and set(answer) == {"error"}
        for reply in replies
        for answer in reply.values()
    )
    return EXIT_FAILED if failed else EXIT_OK


def add_remote_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    """The flags of `inspect` and `control` (the common -A/-b/--result-backend are there)."""
    p.add_argument("method", help=f"the {kind} command (`millpond {kind} help` lists them)")
    p.add_argument("arguments", nargs="*", help="the command's own arguments")
    p.add_argument("-d", "--destination", help="comma-separated node names (default: every worker)")
    p.add_argument("-t", "--timeout", type=float, default=1.0, help="seconds to wait")
    p.add_argument("-j", "--json", action="store_true", help="print the replies as JSON")
    p.add_argument("--args", default="{}", help="keyword arguments as a JSON object")
    p.add_argument("--pattern", help="only nodes whose name matches this glob")
    if kind == "control":
        p.add_argument("--terminate", action="store_true", help="revoke: also stop it")
        p.add_argument("--signal", help="revoke --terminate: the signal (default TERM)")


class RemoteCommand(CoreCommand):
    """`millpond inspect` or `millpond control` (`millpond.commands` entry points)."""

    def __init__(self, kind: str, help: str) -> None:
        self.kind = kind
        self.help = help  # type: ignore[misc]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_remote_arguments(parser, self.kind)

    def run(self, ns: argparse.Namespace) -> int:
        from millpond_cli.main import load_from_args

        return cmd_remote(ns, self.kind, load_from_args)


class EventsCommand(CoreCommand):
    """`millpond events`: print the events workers send (millpond's and Celery's), as they come."""

    help = "print the events workers send (millpond's and Celery's), as they come"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--json", action="store_true", help="one JSON object per event, as sent"
        )
        parser.add_argument(
            "--type", default="*", help="only events whose type matches, e.g. 'task-*'"
        )
        parser.add_argument(
            "--hostname",
            default="*",
            help="only events from workers whose name matches, e.g. '*@web1'",
        )
        parser.add_argument("--limit", type=int, help="exit after this many events")
        parser.add_argument("--timeout", type=float, help="exit after this many seconds")

    def run(self, ns: argparse.Namespace) -> int:
        """Listen on the event exchange and print each event until Ctrl-C, --limit or --timeout."""
        import time

        from millpond.produce.app import Millpond
        from millpond_cli.main import load_from_args
        from millpond_control.event_stream import EventStream, describe

        settings, _app = load_from_args(ns)
        app = Millpond("cli", settings=settings)
        deadline = None if ns.timeout is None else time.monotonic() + ns.timeout
        seen = 0
        try:
            with EventStream(app.broker, ns.type, ns.hostname) as stream:
                print(f"listening for events on {app.broker.system}", file=sys.stderr, flush=True)
                while ns.limit is None or seen < ns.limit:
                    wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                    if wait <= 0:
                        break
                    for event in stream.receive(wait):
                        print(json.dumps(event) if ns.json else describe(event), flush=True)
                        seen += 1
                        if ns.limit is not None and seen >= ns.limit:
                            break
                if stream.skipped:
                    print(f"{stream.skipped} messages were not events", file=sys.stderr)
        finally:
            app.close()
        return EXIT_OK


INSPECT = RemoteCommand("inspect", "ask workers about their state (ping, stats, active, ...)")
CONTROL = RemoteCommand(
    "control", "tell workers to do something (revoke, shutdown, pool_grow, ...)"
)
EVENTS = EventsCommand()
