"""The control-command registry: a command name -> its handler, kind and declared arguments.

Celery's remote control calls a command by name (`method` in the pidbox request) with keyword
`arguments`; the worker answers `{hostname: result}`. Every command millpond answers is one small
registration here, so a feature adds its own commands (`enable_events`, `rate_limit`, ...)
without touching the dispatcher:

    from millpond_control.registry import command, ok

    @command(kind="control", args=(("task_name", str), ("rate_limit", str)))
    def rate_limit(ctx: ControlContext, task_name: str, rate_limit: str, **_: Any) -> Reply:
        ...
        return ok("new rate limit set successfully")

* `kind` is `inspect` (reads worker state) or `control` (changes it); `safe` (default: every
  `inspect` command) marks what the read-only safe list allows (`control_commands = safe`).
* `args` are the positional arguments the command line takes (`millpond control rate_limit
  tasks.add 10/m`), each with the type it is parsed to, as Celery declares them for its CLI.
* A handler gets a `ControlContext` (the worker, this node's name, the request) and the request's
  arguments as keywords; it returns a JSON value. By Celery's convention a `control` command
  answers `{"ok": ...}` or `{"error": ...}` (`ok()`, `nok()`); raising is turned into
  `{"error": "<repr>"}` by the dispatcher, and logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from millpond.consume.worker import Worker
    from millpond_control.component import ControlPlane

CommandKind = Literal["inspect", "control"]
Reply = Any  # a JSON value
Handler = Callable[..., Reply]


@dataclass(frozen=True, slots=True)
class Request:
    """One pidbox request as it arrived (after the destination matched)."""

    method: str
    arguments: Mapping[str, Any]
    #: `{exchange, routing_key}` of the caller's reply queue; None for a cast (no reply wanted)
    reply_to: Mapping[str, Any] | None = None
    ticket: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ControlContext:
    """What a handler works with: the worker (its state, pool, app, settings) and the request."""

    worker: Worker
    hostname: str
    request: Request


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    kind: CommandKind
    handler: Handler
    safe: bool
    args: tuple[tuple[str, type], ...] = ()
    #: a trailing argument that takes the rest of the command line (`revoke ID [ID ...]`)
    variadic: str | None = None
    help: str = ""


class Registry:
    """Commands by name. The worker answers what is registered when its node starts."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, cmd: Command) -> Command:
        if cmd.kind not in ("inspect", "control"):
            raise ValueError(f"command {cmd.name!r}: kind must be inspect or control")
        self._commands[cmd.name] = cmd
        return cmd

    def register(
        self,
        name: str | None = None,
        *,
        kind: CommandKind,
        safe: bool | None = None,
        args: tuple[tuple[str, type], ...] = (),
        variadic: str | None = None,
        help: str = "",
    ) -> Callable[[Handler], Handler]:
        """Decorator: register `handler` under `name` (default: the function's name)."""

        def decorate(handler: Handler) -> Handler:
            doc = (handler.__doc__ or "").strip().splitlines()
            self.add(
                Command(
                    name or handler.__name__,
                    kind,
                    handler,
                    kind == "inspect" if safe is None else safe,
                    args,
                    variadic,
                    help or (doc[0] if doc else ""),
                )
            )
            return handler

        return decorate

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(sorted(self._commands.values(), key=lambda c: c.name))


#: the registry the worker's node answers from
COMMANDS = Registry()
command = COMMANDS.register


def ok(value: Any) -> dict[str, Any]:
    """A control command's success reply, as Celery's handlers answer."""
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    """A control command's refusal or failure, as Celery's handlers answer."""
    return {"error": value}


def plane(worker: Worker) -> ControlPlane:
    """The worker's control plane (what the commands read: its revoked set, node, settings)."""
    found = worker.components.get("control")
    if found is None:
        raise LookupError(f"worker {worker.name} has no control plane (millpond-control)")
    return cast("ControlPlane", found)
