"""Settings: declared once, read once, validated, frozen.

Precedence, lowest first: defaults < settings file (`millpond.toml`, or the file named by
`MILLPOND_SETTINGS_FILE`) < `MILLPOND_*` environment variables < command-line flags. dynaconf reads the
file and the environment; each value is then cast and checked against its declaration here, so a bad
value fails at start-up with the setting's name, where it came from, the value and what is allowed.
The hot path reads the frozen `Settings` dataclass, never dynaconf.

Plugins declare their own section (`[prefork]` in the file, `MILLPOND_PREFORK__MAX_TASKS_PER_CHILD` in
the environment) as a `Section` published under the `millpond.settings` entry-point group.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from millpond.exceptions import ConfigurationError

ENV_PREFIX = "MILLPOND_"
#: environment variables with the prefix that are not settings
META_ENV = frozenset({"MILLPOND_SETTINGS_FILE", "MILLPOND_HOME", "MILLPOND_PATCHED"})
TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE = frozenset({"0", "false", "no", "off", "n", "f"})


@dataclass(frozen=True, slots=True)
class Option:
    """One setting's declaration: the single source of validation, `millpond config` and the docs."""

    name: str
    kind: str  # str | int | float | bool | list
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    nullable: bool = False
    secret: bool = False

    def env_name(self, section: str | None) -> str:
        if section:
            return f"{ENV_PREFIX}{section.upper()}__{self.name.upper()}"
        return f"{ENV_PREFIX}{self.name.upper()}"

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        text = {
            "str": "a string",
            "int": "a whole number",
            "float": "a number",
            "bool": "true or false (also yes/no, on/off, 1/0)",
            "list": "a list (a TOML array, or comma-separated text)",
        }[self.kind]
        if self.minimum is not None:
            text += f" >= {self.minimum:g}"
        if self.nullable:
            text += ", or empty for none"
        return text

    def cast(self, value: Any) -> Any:
        """The value as this option's type; raises ValueError with what is allowed."""
        if value is None or (self.nullable and isinstance(value, str) and value.strip() == ""):
            if self.nullable:
                return None
            raise ValueError(f"a value is required: {self.allowed()}")
        out: Any
        if self.kind == "str":
            # env values are parsed as TOML: a numeric password arrives as an int; keep it text
            if isinstance(value, bool | int | float | str):
                out = str(value).lower() if isinstance(value, bool) else str(value)
            else:
                raise ValueError(f"{value!r} is not text; expected {self.allowed()}")
        elif self.kind == "int":
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a whole number")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str):
                try:
                    value = int(value.strip())
                except ValueError:
                    raise ValueError(f"{value!r} is not a whole number")
            if not isinstance(value, int):
                raise ValueError(f"{value!r} is not a whole number")
            out = value
        elif self.kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is not a number")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{value!r} is not a number")
        elif self.kind == "bool":
            if isinstance(value, bool):
                out = value
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            elif isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
                out = value.strip().lower() in TRUE
            else:
                raise ValueError(f"{value!r} is not a boolean; expected {self.allowed()}")
        elif self.kind == "list":
            if isinstance(value, str):
                out = [part.strip() for part in value.split(",") if part.strip()]
            elif isinstance(value, list | tuple):
                out = [str(v) for v in value]
            else:
                raise ValueError(f"{value!r} is not a list")
        else:  # pragma: no cover - declarations are ours
            raise ValueError(f"unknown kind {self.kind}")
        if self.choices is not None:
            probe = out.lower() if isinstance(out, str) else out
            choices = [c.lower() if isinstance(c, str) else c for c in self.choices]
            if probe not in choices:
                raise ValueError(f"{value!r} is not allowed; expected {self.allowed()}")
            out = self.choices[choices.index(probe)]
        if self.minimum is not None and isinstance(out, int | float) and out < self.minimum:
            raise ValueError(f"{value!r} is too small; expected {self.allowed()}")
        return out


@dataclass(frozen=True, slots=True)
class Section:
    """A group of options: the core's (name None) or a plugin's (`[name]` / `MILLPOND_NAME__*`)."""

    name: str | None
    title: str
    options: tuple[Option, ...]

    def option(self, name: str) -> Option | None:
        for opt in self.options:
            if opt.name == name:
                return opt
        return None

    def validate(self, options: Mapping[str, Any], what: str) -> dict[str, Any]:
        """Cast each given option against its declaration; unknown or bad ones raise
        ConfigurationError naming `what` (e.g. "prefork pool option"). For plugins handed options
        directly (tests, embedding) rather than through `Settings.section`."""
        values: dict[str, Any] = {}
        for key, value in options.items():
            opt = self.option(key)
            if opt is None:
                known = ", ".join(o.name for o in self.options)
                raise ConfigurationError(
                    f"unknown {what} {key!r}; the [{self.name}] section has: {known}"
                )
            try:
                values[key] = opt.cast(value)
            except ValueError as exc:
                raise ConfigurationError(f"{what} {key!r}: {exc}") from None
        return values


CORE = Section(
    None,
    "Core",
    (
        Option(
            "app", "str", None, "The app to run, as module:attribute (the -A flag).", nullable=True
        ),
        Option(
            "broker_url",
            "str",
            None,
            "Broker URL; unset means the embedded sqlite:// broker (zero servers, one machine).",
            nullable=True,
            secret=True,
        ),
        Option(
            "result_backend",
            "str",
            None,
            "Result backend URL; unset means the broker's own "
            "store (sqlite, redis; none for amqp).",
            nullable=True,
            secret=True,
        ),
        Option(
            "pool",
            "str",
            "threads",
            "Execution pool plugin: solo, threads, prefork, gevent, "
            "eventlet, asyncio, or any installed third-party pool.",
        ),
        Option(
            "concurrency",
            "int",
            None,
            "Jobs run at once; unset means the pool's default "
            "(CPU count for threads and prefork, 100 for green pools).",
            minimum=1,
            nullable=True,
        ),
        Option("queues", "list", ["celery"], "Queues the worker consumes, in priority order."),
        Option(
            "default_queue",
            "str",
            "celery",
            "Queue a task is sent to when neither the task "
            "nor the call names one (Celery's default, so both can share queues).",
        ),
        Option(
            "prefetch_multiplier",
            "int",
            4,
            "Unacknowledged messages held per unit of concurrency.",
            minimum=1,
        ),
        Option(
            "acks_late",
            "bool",
            True,
            "Acknowledge after the task finished (at-least-once); "
            "false acknowledges before it runs (at-most-once).",
        ),
        Option(
            "max_deliveries",
            "int",
            5,
            "Deliveries of one message before it is dead-lettered "
            "instead of run again (the redelivery cap for poison messages).",
            minimum=1,
        ),
        Option(
            "time_limit",
            "float",
            None,
            "Default hard time limit of a task, in seconds.",
            minimum=0,
            nullable=True,
        ),
        Option(
            "soft_time_limit",
            "float",
            None,
            "Default soft time limit of a task, in seconds.",
            minimum=0,
            nullable=True,
        ),
        Option(
            "unsupported_options",
            "str",
            "warn",
            "What to do when a task asks for something "
            "the pool cannot do (a time limit on solo): warn, or error (fail the task).",
            choices=("warn", "error"),
        ),
        Option(
            "shutdown_timeout",
            "float",
            30.0,
            "Seconds a warm shutdown waits for running tasks before it turns cold.",
            minimum=0,
        ),
        Option("ignore_result", "bool", False, "Do not store task results by default."),
        Option("result_expires", "float", 86400.0, "Seconds a stored result is kept.", minimum=1),
        Option(
            "accept_content",
            "list",
            ["application/json"],
            "Content types the worker "
            "accepts; add application/x-python-serialize only if every producer is trusted.",
        ),
        Option(
            "max_message_size",
            "int",
            10 * 1024 * 1024,
            "Largest message body accepted, in bytes; larger messages are dead-lettered.",
            minimum=1,
        ),
        Option(
            "signing_key",
            "str",
            None,
            "Shared secret: producers sign every message "
            "(HMAC-SHA256) and workers dead-letter unsigned or altered ones.",
            nullable=True,
            secret=True,
        ),
        Option(
            "log_level",
            "str",
            "INFO",
            "Log level.",
            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        ),
        Option(
            "log_format",
            "str",
            "auto",
            "auto (console on a terminal, JSON otherwise), json, or console.",
            choices=("auto", "json", "console"),
        ),
        Option(
            "log_stdlib",
            "bool",
            False,
            "Also route the standard logging module's root "
            "logger through millpond's format (off: the root logger is left alone).",
        ),
        Option(
            "trace_link",
            "bool",
            False,
            "Start each task's process span as a new trace "
            "linked to the producer's, instead of continuing the producer's trace.",
        ),
        Option(
            "trace_span_recorder",
            "bool",
            True,
            "Record the worker's process and run spans with millpond's span recorder (about a "
            "seventh of the OpenTelemetry SDK's CPU per task) when tracing exports over OTLP/HTTP; "
            "false makes them SDK spans, for span processors of your own.",
        ),
        Option(
            "health_port",
            "int",
            None,
            "Serve /livez and /readyz (Kubernetes probes) on this "
            "port; 0 picks a free port (logged); unset means no health endpoint.",
            minimum=0,
            nullable=True,
        ),
        Option(
            "health_host",
            "str",
            "0.0.0.0",
            "Address the health endpoint listens on "
            "(0.0.0.0: reachable by the kubelet on the pod's IP).",
        ),
        Option(
            "health_liveness_timeout",
            "float",
            30.0,
            "/livez fails when the consumer loop "
            "has not turned for this many seconds (a task running inline on solo counts as "
            "turning).",
            minimum=1,
        ),
        Option(
            "worker_name",
            "str",
            None,
            "Name of this worker in logs and spans; default pid@hostname.",
            nullable=True,
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated, frozen settings the worker and the app read on the hot path."""

    app: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    pool: str = "threads"
    concurrency: int | None = None
    queues: tuple[str, ...] = ("celery",)
    default_queue: str = "celery"
    prefetch_multiplier: int = 4
    acks_late: bool = True
    max_deliveries: int = 5
    time_limit: float | None = None
    soft_time_limit: float | None = None
    unsupported_options: str = "warn"
    shutdown_timeout: float = 30.0
    ignore_result: bool = False
    result_expires: float = 86400.0
    accept_content: tuple[str, ...] = ("application/json",)
    max_message_size: int = 10 * 1024 * 1024
    signing_key: str | None = None
    log_level: str = "INFO"
    log_format: str = "auto"
    log_stdlib: bool = False
    trace_link: bool = False
    trace_span_recorder: bool = True
    health_port: int | None = None
    health_host: str = "0.0.0.0"
    health_liveness_timeout: float = 30.0
    worker_name: str | None = None
    #: raw plugin sections by name (validated by `section()`)
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: where each value came from: "default", "file <path>", "env NAME", "flag", "code"
    sources: Mapping[str, str] = field(default_factory=dict)
    #: environment values exactly as typed ("name" or "section.name"): text settings use these
    env_text: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def section(self, declaration: Section) -> Mapping[str, Any]:
        """A plugin section's values, cast and checked against its declaration."""
        assert declaration.name
        raw = self.sections.get(declaration.name, {})
        out: dict[str, Any] = {}
        for opt in declaration.options:
            key = f"{declaration.name}.{opt.name}"
            where = self.sources.get(key, "default")
            value = raw.get(opt.name, opt.default)
            if opt.kind == "str" and where.startswith("env ") and key in self.env_text:
                value = self.env_text[key]
            out[opt.name] = _cast(opt, value, where, declaration.name)
        unknown = set(raw) - {o.name for o in declaration.options}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigurationError(
                f"unknown setting {declaration.name}.{name}{_suggest(name, declaration)}; "
                f"the [{declaration.name}] section has: "
                + ", ".join(o.name for o in declaration.options)
            )
        return MappingProxyType(out)

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def _suggest(name: str, section: Section) -> str:
    close = difflib.get_close_matches(name, [o.name for o in section.options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _cast(opt: Option, value: Any, where: str, section: str | None = None) -> Any:
    try:
        return opt.cast(value)
    except ValueError as exc:
        full = f"{section}.{opt.name}" if section else opt.name
        shown = "***" if opt.secret else repr(value)
        detail = str(exc).replace(repr(value), shown) if opt.secret else str(exc)
        raise ConfigurationError(
            f"setting {full!r} ({where}) has a bad value {shown}: {detail}"
        ) from None


def settings_file(env: Mapping[str, str]) -> Path | None:
    named = env.get("MILLPOND_SETTINGS_FILE")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigurationError(
                f"MILLPOND_SETTINGS_FILE names {named!r}, which is not a readable file"
            )
        return path
    local = Path("millpond.toml")
    return local if local.is_file() else None


def _read_sources(
    path: Path | None, env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(file values, env values, env text), dicts of lower-case keys; sections as nested dicts.

    Env values are parsed as TOML (`5` an int, `true` a bool, `[1, 2]` a list). That parse would
    mistype text: a numeric password `0x1F` becomes `31` and `1e3` becomes `1000.0`, a date-like
    name becomes a date, and dynaconf evaluates `@json`/`@format` markers. So the text as typed
    is kept too (keyed `name` or `section.name`), and text settings use it (see `Option.kind`).
    """
    from dynaconf import Dynaconf

    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            options: dict[str, Any] = {
                "environments": False,
                "load_dotenv": False,
                "envvar_prefix": False,
                "merge_enabled": False,
            }
            conf = Dynaconf(settings_files=[str(path)], **options)
            internal = set(Dynaconf(**options).as_dict())  # dynaconf's own keys, not settings
            file_values = {k.lower(): v for k, v in conf.as_dict().items() if k not in internal}
        except Exception as exc:
            raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc
    env_values: dict[str, Any] = {}
    env_text: dict[str, str] = {}
    names = [k for k in env if k.startswith(ENV_PREFIX) and k not in META_ENV]
    if names:
        # dynaconf parses each value as TOML (1234 -> int, [a, b] -> list, yes -> "yes")
        from dynaconf.utils.parse_conf import parse_conf_data

        for key in names:
            rest = key[len(ENV_PREFIX) :].lower()
            try:
                value = parse_conf_data(env[key], tomlfy=True, box_settings={})
            except Exception:  # a malformed @marker: keep the text, the cast reports it
                value = env[key]
            if "__" in rest:
                section, _, name = rest.partition("__")
                env_values.setdefault(section, {})[name] = value
                env_text[f"{section}.{name}"] = env[key]
            else:
                env_values[rest] = value
                env_text[rest] = env[key]
    return file_values, env_values, env_text


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    file: Path | str | None = None,
    code: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, merge and validate every source; raises ConfigurationError naming the bad setting.

    `code` holds values given to `Millpond(...)` in Python: above the file, below the environment.
    """
    env = os.environ if env is None else env
    path = Path(file) if file is not None else settings_file(env)
    file_values, env_values, env_text = _read_sources(path, env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    sections: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    layers: list[tuple[Mapping[str, Any], Callable[[str, str | None], str]]] = [
        (file_values, lambda n, s: f"file {path}"),
        (dict(code or {}), lambda n, s: "code"),
        (env_values, lambda n, s: f"env {_env_name(n, s)}"),
        ({k: v for k, v in (flags or {}).items() if v is not None}, lambda n, s: "flag"),
    ]
    for layer, origin in layers:
        for key, value in layer.items():
            opt = CORE.option(key)
            if opt is not None:
                values[key] = value
                sources[key] = origin(key, None)
            elif isinstance(value, Mapping) and origin(key, None).startswith(("file", "env")):
                target = sections.setdefault(key, {})
                for name, inner in value.items():
                    target[name.lower()] = inner
                    sources[f"{key}.{name.lower()}"] = origin(name.lower(), key)
            else:
                where = origin(key, None)
                hint = _suggest(key, CORE)
                message = f"unknown setting {key!r} ({where}){hint}"
                if where.startswith("env"):
                    warnings.append(message + "; ignored")
                else:
                    raise ConfigurationError(message + "; run `millpond config` to list settings")
    out: dict[str, Any] = {}
    for opt in CORE.options:
        value = values.get(opt.name, opt.default)
        if opt.kind == "str" and sources.get(opt.name, "").startswith("env "):
            value = env_text[opt.name]  # exactly as typed, never TOML's reading of it
        cast = _cast(opt, value, sources.get(opt.name, "default"))
        out[opt.name] = tuple(cast) if isinstance(cast, list) else cast
        sources.setdefault(opt.name, "default")
    if not out["queues"]:
        raise ConfigurationError("setting 'queues' is empty: name at least one queue to consume")
    soft, hard = out["soft_time_limit"], out["time_limit"]
    if soft is not None and hard is not None and soft >= hard:
        raise ConfigurationError(
            f"soft_time_limit ({soft:g}s) must be shorter than time_limit ({hard:g}s)"
        )
    return Settings(
        **out,
        sections=MappingProxyType({k: MappingProxyType(v) for k, v in sections.items()}),
        sources=MappingProxyType(sources),
        env_text=MappingProxyType(env_text),
        warnings=tuple(warnings),
    )


def _env_name(name: str, section: str | None) -> str:
    return (
        f"{ENV_PREFIX}{section.upper()}__{name.upper()}"
        if section
        else f"{ENV_PREFIX}{name.upper()}"
    )


def plugin_sections() -> list[Section]:
    """Sections declared by installed plugins (entry-point group `millpond.settings`)."""
    from importlib.metadata import entry_points

    out: list[Section] = []
    for ep in entry_points(group="millpond.settings"):
        try:
            section = ep.load()
        except Exception as exc:
            raise ConfigurationError(f"cannot load settings of plugin {ep.name!r}: {exc}") from exc
        if isinstance(section, Section):
            out.append(section)
    return out


def describe(settings: Settings, extra: Iterable[Section] = ()) -> list[tuple[str, str, str, str]]:
    """(name, env variable, effective value, source) rows for `millpond config`; secrets masked."""
    from millpond.broker import mask_url

    rows: list[tuple[str, str, str, str]] = []
    for opt in CORE.options:
        value = getattr(settings, opt.name)
        shown = value
        if opt.secret and isinstance(value, str) and value:
            # a URL keeps its host visible (only the password goes); any other secret goes whole
            shown = mask_url(value) if "://" in value else "***"
        if isinstance(shown, tuple):
            shown = ",".join(shown)
        rows.append(
            (
                opt.name,
                opt.env_name(None),
                "" if shown is None else str(shown),
                settings.sources.get(opt.name, "default"),
            )
        )
    for section in extra:
        assert section.name
        values = settings.section(section)
        for opt in section.options:
            value = values[opt.name]
            shown = "***" if opt.secret and value else value
            rows.append(
                (
                    f"{section.name}.{opt.name}",
                    opt.env_name(section.name),
                    "" if shown is None else str(shown),
                    settings.sources.get(f"{section.name}.{opt.name}", "default"),
                )
            )
    return rows
