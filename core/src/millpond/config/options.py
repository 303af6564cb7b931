"""Setting declarations: a frozen-dataclass field made with `setting(...)` becomes an `Option`
(name, kind, default, meaning); a `Section` groups a component's options and casts raw values from
every source through them, with one boolean vocabulary. Below the settings reader and the plugin
loader, which hands each plugin its section.
"""

from __future__ import annotations

import copy
import difflib
import math
import types
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, urlsplit

from millpond.contracts.broker import mask_url
from millpond.exceptions import ConfigurationError

ENV_PREFIX = "MILLPOND_"
#: the one boolean vocabulary, for every source: file, environment, code, flags and URL queries
TRUE = frozenset({"true", "yes", "on", "1"})
FALSE = frozenset({"false", "no", "off", "0"})

Kind = Literal["str", "int", "float", "bool", "list", "table"]

#: per kind: what a wrong value is not, and what is allowed
_WORDS: dict[str, tuple[str, str]] = {
    "str": ("text", "text"),
    "int": ("a whole number", "a whole number"),
    "float": ("a number", "a number"),
    "bool": ("a boolean", "true or false (also yes/no, on/off, 1/0)"),
    "list": ("a list of plain values", "a list (a TOML array, or comma-separated text)"),
    "table": ("a table", "a table (a TOML table, e.g. {password = 'x'})"),
}


@dataclass(frozen=True, slots=True)
class Option:
    """One setting's declaration: the single source of validation, `millpond config` and the docs."""

    name: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    #: masked in `millpond config` and in error messages
    secret: bool = False
    #: a table whose keys are names the user chose (beat's entry names), kept as written;
    #: other tables' keys are option names, folded to lower case
    keep_case: bool = False

    def allowed(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _WORDS[self.kind][1] + self.bounds()
        return text + (", or empty for none" if self.nullable else "")

    def bounds(self, at_least: str = ">=", at_most: str = "<=") -> str:
        """The range a number must fall in, as error messages and the settings reference say it."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f" from {low:g} to {high:g}"
        if low is not None:
            return f" {at_least} {low:g}"
        return f" {at_most} {high:g}" if high is not None else ""

    def cast(self, value: Any) -> Any:
        """The value as this option's type, from any source (TOML, text, Python); a ValueError
        says what is wrong and what is allowed, not the value (the caller shows it, masked)."""
        if value is None or (self.nullable and isinstance(value, str) and value.strip() == ""):
            if self.nullable:
                return None
            raise ValueError(f"a value is required: expected {self.allowed()}")
        try:
            out = _as(self.kind, value)
            if out is None:
                raise ValueError(f"not {_WORDS[self.kind][0]}")
        except ValueError as exc:
            raise ValueError(f"{exc}; expected {self.allowed()}") from None
        if isinstance(out, dict) and not self.keep_case:
            out = {str(k).lower(): v for k, v in out.items()}
        if self.choices is not None and isinstance(out, tuple):
            return tuple(self._choose(v, f"{v!r} is not allowed; each item must be") for v in out)
        if self.choices is not None:
            return self._choose(out, "not allowed; expected")
        if isinstance(out, int | float) and not isinstance(out, bool):
            if self.minimum is not None and out < self.minimum:
                raise ValueError(f"too small; expected {self.allowed()}")
            if self.maximum is not None and out > self.maximum:
                raise ValueError(f"too large; expected {self.allowed()}")
        return out

    def _choose(self, value: Any, problem: str) -> Any:
        """The declared choice `value` names (compared as text, without case)."""
        named = {str(c).lower(): c for c in self.choices or ()}
        if (choice := named.get(str(value).lower())) is None:
            raise ValueError(f"{problem} {self.allowed()}")
        return choice


def _as(kind: Kind, value: Any) -> Any:
    """`value` (not None) as `kind`, or None when it is not one; ValueError for a pointed reason."""
    if kind == "bool":  # True, 1 and "yes" alike: every source says it in one vocabulary
        text = str(value).strip().lower()
        return True if text in TRUE else False if text in FALSE else None
    if isinstance(value, bool):  # a boolean is text "true"/"false", and nothing else
        return str(value).lower() if kind == "str" else None
    if kind == "str":
        return str(value) if isinstance(value, int | float | str) else None
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with suppress(ValueError):
                return int(value.strip())
        return value if isinstance(value, int) else None
    if kind == "float":
        try:
            out = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            return None
        if out is not None and not math.isfinite(out):
            raise ValueError("not a finite number")
        return out
    if kind == "list":
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                raise ValueError('not a TOML array (quote its items, e.g. ["a", "b"])')
            return tuple(part.strip() for part in value.split(",") if part.strip())
        plain = isinstance(value, list | tuple) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
        )
        return tuple(str(v) for v in value) if plain else None
    return dict(value) if isinstance(value, Mapping) else None


def setting(default: Any, help: str, **details: Any) -> Any:
    """A setting, declared as a field of a frozen dataclass (the core's `Settings`, a plugin's
    section): the field gives its name, its annotation its kind (`X | None` makes it nullable, a
    tuple of text is a list, a dict a table), the rest is as in `Option`."""
    metadata = {"help": help, **details}
    if isinstance(default, dict):  # a dataclass takes a mutable default only as a factory
        return field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


#: a field's type -> its kind: `tuple[str, ...]` is a list (kept a tuple), a mapping a table
_KINDS: dict[Any, Kind] = {str: "str", int: "int", float: "float", bool: "bool", tuple: "list"}
_KINDS.update({dict: "table", Mapping: "table"})


def declared(cls: type) -> tuple[Option, ...]:
    """The `Option` of each field of `cls` declared with `setting(...)`, in their order."""
    hints = get_type_hints(cls)
    options = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        kind, nullable = hints[f.name], False
        if isinstance(kind, types.UnionType):
            nullable = type(None) in get_args(kind)
            (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[operator]
        base = get_origin(kind) or kind
        if base not in _KINDS:
            raise TypeError(
                f"setting {cls.__name__}.{f.name} is a {kind}: declare a str, int, float, bool, "
                "tuple[str, ...] or Mapping[str, Any], optionally `| None`"
            )
        options.append(Option(f.name, _KINDS[base], default, nullable=nullable, **f.metadata))
    return tuple(options)


def suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True, slots=True)
class Section:
    """A group of options: the core's (name None) or a plugin's (`[name]` / `MILLPOND_NAME__*`)."""

    name: str | None
    title: str
    options: tuple[Option, ...]
    #: moved names, or kombu/Celery names that mean something else here: refused with an explanation
    hints: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def option(self, name: str) -> Option | None:
        return next((opt for opt in self.options if opt.name == name), None)

    def key(self, name: str) -> str:
        """The setting's full name: `lease_timeout` in the [redis] section is `redis.lease_timeout`."""
        return f"{self.name}.{name}" if self.name else name

    def defaults(self) -> dict[str, Any]:
        """Each option's default (a table copied: the declaration stays as it is)."""
        return {opt.name: copy.copy(opt.default) for opt in self.options}

    def unknown(self, name: str, where: str) -> ConfigurationError:
        """The error for a name this section does not declare, with a hint or a suggestion."""
        if name in self.hints:
            return ConfigurationError(
                f"setting {self.key(name)!r} ({where}) is not supported: {self.hints[name]}"
            )
        names = [opt.name for opt in self.options]
        listed = f"the [{self.name}] section has: {', '.join(names)}" if self.name else None
        return ConfigurationError(
            f"unknown setting {self.key(name)!r} ({where}){suggest(name, names)}; "
            f"{listed or 'run `millpond config` to list settings'}"
        )

    def cast(self, opt: Option, value: Any, where: str, *, typed: Any = None) -> Any:
        """`opt.cast(value)`, or a ConfigurationError naming the setting, its source, the value
        (`typed` if given: as the user wrote it; masked for secrets) and what is allowed."""
        try:
            return opt.cast(value)
        except ValueError as exc:
            shown = value if typed is None else typed
            shown = "***" if opt.secret and shown not in (None, "") else repr(shown)
            raise ConfigurationError(
                f"setting {self.key(opt.name)!r} ({where}) has a bad value {shown}: {exc}"
            ) from None

    def cast_all(self, given: Iterable[tuple[str, Any]], where: str) -> dict[str, Any]:
        """Each (name, value) cast through its option; a name not declared is an error."""
        values: dict[str, Any] = {}
        for name, value in given:
            if (opt := self.option(name)) is None:
                raise self.unknown(name, where)
            values[name] = self.cast(opt, value, where)
        return values

    def query(
        self, url: str, *, masked: str | None = None, query: str | None = None
    ) -> dict[str, Any]:
        """The URL's query parameters (how every broker reads `redis://h/0?lease_timeout=10`),
        each cast through its declaration; an unknown name is an error. `masked` is the URL as
        errors show it (`mask_url`'s by default); `query` the query text, for URL forms `urlsplit`
        cannot take apart; a ';'-joined list (kombu's failover and sentinel forms) gives the
        queries of all its members."""
        where = f"in the query of {masked if masked is not None else mask_url(url)}"
        if query is None:
            query = "&".join(q for q in (urlsplit(m).query for m in url.split(";")) if q)
        return self.cast_all(parse_qsl(query, keep_blank_values=True), where)

    def resolve(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        url: str | None = None,
        masked: str | None = None,
        query: str | None = None,
    ) -> dict[str, Any]:
        """Every option's value: its default, then the URL's query parameters, then `options`
        (`masked` and `query` as in `query`). The core's `Settings.plugin_options` already weighed
        the URL's query by where each value came from, so `options` win; a test or an embedding
        program may pass plain values, checked the same way."""
        given = self.query(url, masked=masked, query=query) if url else {}
        return self.defaults() | given | self.cast_all((options or {}).items(), "options")
