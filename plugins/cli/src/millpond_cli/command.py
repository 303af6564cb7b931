"""The contract of a `millpond` subcommand a plugin adds (`millpond beat` is one): an instance
under the `millpond.commands` entry-point group, named after the subcommand. `millpond --help`
lists it from metadata; only the command run is imported, its parser already holding the common
flags (-A/--app, -b/--broker, --result-backend). It lives with the CLI, its only caller: the core
only lists the group (`millpond plugins`, pip hints).
"""

from __future__ import annotations

import argparse
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.produce.app import Millpond


class Command(ABC):
    """One subcommand: its help line, its arguments and what it does."""

    #: the one-line help `millpond --help` shows
    help: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 - optional
        """Add the command's own arguments (the common ones are there already)."""

    @abstractmethod
    def run(self, ns: argparse.Namespace) -> int:
        """Run the command; return the exit code (0 ok, 1 failed, 2 usage or settings error).
        `ConfigurationError`, `PluginNotFound` and `PluginLoadError` exit with 2 and their message."""

    def embed(self, app: Millpond, settings: Settings) -> Callable[[], None]:
        """Run the command inside a worker (`millpond worker -B` for beat); return what stops it.
        Called before the worker is built, so check everything now (a mistake stops the worker
        from starting); start threads from a `worker_ready` hook (`app.add_hooks`), after a
        prefork pool forked."""
        raise NotImplementedError(f"{type(self).__name__} cannot run inside a worker")


def json_object(flag: str, text: str, example: str) -> dict[str, Any]:
    """The JSON object a command's flag was given (`--kwargs`, `--args`), or a usage error that
    names the flag and shows an `example` of what it takes."""
    value: dict[str, Any] = _json_flag(flag, text, dict, f"a JSON object, e.g. '{example}'")
    return value


def json_array(flag: str, text: str, example: str) -> list[Any]:
    """The JSON array a command's flag was given (`send --args`), as `json_object` reads one."""
    value: list[Any] = _json_flag(flag, text, list, f"a JSON array, e.g. '{example}'")
    return value


def _json_flag(flag: str, text: str, kind: type, wanted: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(f"{flag} must be {wanted}")
    return value
