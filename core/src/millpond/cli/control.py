"""`millpond inspect` and `millpond control`: Celery's remote control, with no Celery installed.

They speak kombu's pidbox (see `consume.control.mailbox`), so they reach millpond and Celery
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

from millpond.consume.control import commands as _builtin  # noqa: F401 - registers them
from millpond.consume.control import ratelimit as _rate_limit  # noqa: F401 - registers it
from millpond.consume.control.registry import COMMANDS, Command
from millpond.exceptions import ConfigurationError

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
    try:
        extra = json.loads(ns.args)
    except ValueError as exc:
        raise ConfigurationError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise ConfigurationError("--args must be a JSON object, e.g. '{\"terminate\": true}'")
    arguments = {**_typed(cmd, ns.arguments), **extra}
    if kind == "control" and getattr(ns, "terminate", False):
        arguments["terminate"] = True
    if kind == "control" and getattr(ns, "signal", None):
        arguments["signal"] = ns.signal
    from millpond.config.control import SECTION, ControlSettings
    from millpond.produce.app import Millpond
    from millpond.produce.control import Mailbox

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
