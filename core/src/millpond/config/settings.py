"""Settings: declared once, read through dynaconf, validated, frozen.

Lowest first: defaults < the settings file (`millpond.toml`, or `$MILLPOND_SETTINGS_FILE`) <
`Millpond(...)` keywords < `MILLPOND_*` variables (`MILLPOND_REDIS__LEASE_TIMEOUT` is [redis]
lease_timeout) < flags. One Dynaconf instance merges every source and runs one `Validator` per
given setting, casting it through its declaration; the hot path reads the frozen `Settings`.

The core's settings are the `setting(...)` fields of `Settings` (typed: `settings.pool`), `CORE`
their `Section`. A plugin publishes its `Section` as a `millpond.settings` entry point named after
the plugin (a pool, each URL scheme a broker serves) and gets its validated values, its URL's query
cast by the same declarations, from `Settings.plugin_options`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from millpond.config import plugins
from millpond.config.options import ENV_PREFIX, Option, Section, declared, setting, suggest
from millpond.exceptions import ConfigurationError


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated, frozen settings read on the hot path; the last three fields: what was read."""

    app: str | None = setting(None, "The app to run, as module:attribute (the -A flag).")
    broker_url: str | None = setting(
        None, "Broker URL; unset is the embedded sqlite:// broker (one machine only).", secret=True
    )
    result_backend: str | None = setting(
        None, "Result backend URL; unset is the broker's own store (amqp has none).", secret=True
    )
    pool: str = setting(
        "threads",
        "Execution pool: solo, threads, prefork, gevent, eventlet, asyncio or an installed plugin; "
        "gevent and eventlet monkey-patch, so set them by flag, environment or file, not in code.",
    )
    concurrency: int | None = setting(
        None,
        "Tasks run at once; unset is the pool's default (prefork: CPU count, threads: CPU count + 4"
        " up to 32, green and asyncio: 100).",
        minimum=1,
    )
    queues: tuple[str, ...] = setting(("celery",), "Queues the worker consumes, in priority order.")
    default_queue: str = setting(
        "celery", "Queue used when neither the task nor the call names one (Celery's default too)."
    )
    prefetch_multiplier: int = setting(
        4, "Unacknowledged messages held per unit of concurrency.", minimum=1
    )
    acks_late: bool = setting(
        True, "Ack after the task ran (at-least-once); false acks before it runs (at-most-once)."
    )
    max_deliveries: int = setting(
        5, "Deliveries of a message before it is dead-lettered (caps poison messages).", minimum=1
    )
    time_limit: float | None = setting(None, "Default hard time limit (seconds).", minimum=0)
    soft_time_limit: float | None = setting(None, "Default soft time limit (seconds).", minimum=0)
    unsupported_options: str = setting(
        "warn",
        "Options a pool cannot honour (a time limit on solo): warn, or error (fail the task).",
        choices=("warn", "error"),
    )
    disable_rate_limits: bool = setting(
        False,
        "Ignore every task's rate_limit (Celery's worker_disable_rate_limits); a limit set at run"
        " time by the rate_limit control command still applies.",
    )
    rate_limit_scope: str = setting(
        "worker",
        "Default rate_limit_scope of a task: worker (each worker process allows the rate, as in "
        "Celery) or global (one bucket in rate_limit_store, shared by every worker).",
        choices=("worker", "global"),
    )
    rate_limit_store: str | None = setting(
        None,
        "Global rate limits' store URL; unset: the broker URL, if a limiter plugin serves it.",
        secret=True,
    )
    rate_limit_parking: int | None = setting(
        None,
        "Messages per rate-limited task held for a token beside the prefetch window (unset: the "
        "prefetch count); more go back to the broker as delayed messages.",
        minimum=1,
    )
    rate_limit_max_hold: float = setting(
        60.0,
        "Seconds a rate-limited message may wait, unacknowledged, in the worker for its token; a "
        "longer one goes back to the broker, delayed; keep well under RabbitMQ's consumer_timeout.",
        minimum=1,
    )
    shutdown_timeout: float = setting(
        30.0, "Seconds a warm shutdown waits for running tasks before it turns cold.", minimum=0
    )
    ignore_result: bool = setting(False, "Do not store task results by default.")
    result_expires: float = setting(86400.0, "Seconds a stored result is kept.", minimum=1)
    accept_content: tuple[str, ...] = setting(
        ("application/json",),
        "Content types accepted; pickle (application/x-python-serialize) only if all producers "
        "are trusted. No YAML or msgpack: set task_serializer = 'json' on Celery producers.",
        choices=("application/json", "application/x-python-serialize"),
    )
    max_message_size: int = setting(
        10 * 1024 * 1024, "Largest message body (bytes); larger ones are dead-lettered.", minimum=1
    )
    signing_key: str | None = setting(
        None,
        "Shared HMAC-SHA256 key: producers sign, workers dead-letter unsigned or altered messages.",
        secret=True,
    )
    log_level: str = setting(
        "INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    log_format: str = setting(
        "auto",
        "auto: console on a terminal, JSON otherwise.",
        choices=("auto", "json", "console"),
    )
    log_stdlib: bool = setting(
        True,
        "Under `millpond worker`, format a root logger with no handlers like millpond's logs (so "
        "logging in tasks carries task and trace ids); false never touches the root logger.",
    )
    trace_link: bool = setting(
        False, "Start each task's process span in a new trace linked to the producer's, not in it."
    )
    hooks: tuple[str, ...] = setting(
        ("*",), "Hooks plugins to run (tracing, logs, health, metrics...): * for all, or names."
    )
    worker_name: str | None = setting(None, "Worker name in logs and spans; unset: pid@hostname.")
    #: validated values (defaults included) of every plugin section that was given a value
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: where each "name" or "section.name" came from: default, file <path>, code, env <var>, flag
    sources: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """The rules across settings, checked wherever settings are made (`replace` too)."""
        if not self.queues:
            raise ConfigurationError(
                f"setting 'queues' ({self.source('queues')}) is empty: name at "
                "least one queue to consume"
            )
        soft, hard = self.soft_time_limit, self.time_limit
        if soft is not None and hard is not None and soft >= hard:
            raise ConfigurationError(
                f"soft_time_limit ({soft:g}s, {self.source('soft_time_limit')}) "
                f"must be shorter than time_limit ({hard:g}s, {self.source('time_limit')})"
            )

    def source(self, key: str) -> str:
        """Where the setting `key` ("name", "section.name") came from."""
        return self.sources.get(key, "default")

    def section(self, declaration: Section) -> Mapping[str, Any]:
        """A plugin section's validated values: what was given, defaults for the rest."""
        assert declaration.name, "the core's settings are the fields themselves"
        return self.sections.get(declaration.name) or MappingProxyType(declaration.defaults())

    def plugin_options(self, plugin: str, url_setting: str | None = None) -> dict[str, Any]:
        """The validated values of the plugin `plugin`'s section (a pool, a URL scheme), or {}.
        With `url_setting` ("broker_url", ...) the URL's query counts as given where the URL was,
        so `MILLPOND_BROKER_URL=...?lease_timeout=5` beats the file's [redis] lease_timeout and
        `MILLPOND_REDIS__LEASE_TIMEOUT` a query in the file's URL; from one place the URL wins."""
        declaration = plugins.settings_section(plugin)
        return self.weighed(declaration, url_setting)[0] if declaration else {}

    def weighed(
        self, declaration: Section, url_setting: str | None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """(values, sources) of a section, with the URL's query weighed in (`plugin_options`)."""
        values = dict(self.section(declaration))
        sources = {name: self.source(declaration.key(name)) for name in values}
        if url_setting and (url := getattr(self, url_setting)):
            url_source = self.source(url_setting)
            for name, value in declaration.query(url).items():
                if _RANK[url_source.split()[0]] >= _RANK[sources[name].split()[0]]:
                    values[name], sources[name] = value, f"{url_source} (query)"
        return values, sources

    def replace(self, **changes: Any) -> Settings:
        """A copy with these core settings (an in-process `Worker`'s flags) checked and changed."""
        values = CORE.cast_all(changes.items(), "flag")
        sources = MappingProxyType({**self.sources, **dict.fromkeys(values, "flag")})
        return dataclasses.replace(self, **values, sources=sources)


#: core settings that moved to a plugin's section, and Celery's that live in one: refused with
#: the name to use, from every source
#: (the environment too: a deployment that still sets the old name must not lose its probes)
MOVED = {
    f"health_{name}": f"moved to the [health] section of millpond-health: use health.{name} "
    f"([health] {name} = ... in the file, MILLPOND_HEALTH__{name.upper()} in the environment)"
    for name in ("port", "host", "liveness_timeout")
} | {
    "timezone": "Celery's timezone is millpond-beat's: use beat.timezone ([beat] timezone = ... "
    "in the file, MILLPOND_BEAT__TIMEZONE in the environment, beat={'timezone': ...} in code)"
}

CORE = Section(None, "Core", declared(Settings), hints=MOVED)
#: environment variables with the prefix that are not settings
META_ENV = frozenset(ENV_PREFIX + n for n in ("SETTINGS_FILE", "HOME", "PATCHED", "SKIP_LINT"))
#: how sources outrank each other, by the kind a source's name starts with ("env MILLPOND_POOL")
_RANK = {"default": 0, "file": 1, "code": 2, "env": 3, "flag": 4}
#: a given value: its section and option, its source and the value as written
Given = tuple[Section, Option, str, Any]


def settings_file(env: Mapping[str, str]) -> Path | None:
    named = env.get("MILLPOND_SETTINGS_FILE")
    if named and not Path(named).is_file():
        raise ConfigurationError(
            f"MILLPOND_SETTINGS_FILE names {named!r}, which is not a readable file; "
            "fix the path or unset it"
        )
    path = Path(named or "millpond.toml")
    return path if named or path.is_file() else None


def millpond_home(env: Mapping[str, str] | None = None, *, purpose: str) -> Path:
    """Where millpond keeps files of its own on this machine (the sqlite:// broker, revoked ids):
    `$MILLPOND_HOME`, else `$XDG_DATA_HOME/millpond`, else `~/.local/share/millpond`."""
    env = os.environ if env is None else env
    if env.get("MILLPOND_HOME"):
        return Path(env["MILLPOND_HOME"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "millpond"
    try:
        return Path.home() / ".local" / "share" / "millpond"
    except RuntimeError as exc:
        raise ConfigurationError(
            f"cannot find a home directory for {purpose} ({exc}); set MILLPOND_HOME"
        ) from exc


def _stored(opt: Option, source: str, given: Any, conf: Any) -> Any:
    """A given value as dynaconf must store it: environment text parsed as TOML (as dynaconf's
    env loader does), except for a text setting, which gets it as typed; any other text starting
    with `@` goes in behind `@str`, or dynaconf would read it as a marker (`@json`, `@format`)."""
    if source.startswith("env ") and opt.kind != "str":
        from dynaconf.utils.parse_conf import boolean_fix, parse_conf_data

        with suppress(Exception):  # a malformed @marker: keep the text, the cast reports it
            return parse_conf_data(boolean_fix(given), tomlfy=True, box_settings=conf)
    return _keep_text(given)


def _keep_text(value: Any) -> Any:
    return f"@str {value}" if isinstance(value, str) and value.startswith("@") else value


def _flat(values: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key, value) of file, code or flag values: a plugin's section, given as a table, as its
    "section.name" keys; dynaconf's own file keys (dynaconf_merge, ...) left out."""
    for top, value in values.items():
        top = str(top).lower()
        if top.startswith("dynaconf"):
            continue
        if CORE.option(top) is None and isinstance(value, Mapping):
            yield from ((f"{top}.{str(name).lower()}", inner) for name, inner in value.items())
        else:
            yield top, value


class _Declarations:
    """The declaration of each given name, each plugin section loaded once; ignored names warned."""

    def __init__(self, extra: Iterable[Section]) -> None:
        self.extra = {s.name: s for s in extra if s.name}
        #: the plugin sections values were given for; None where no installed plugin reads one
        self.sections: dict[str, Section | None] = {}
        self.warnings: list[str] = []

    def section(self, name: str, where: str) -> Section | None:
        """The installed section called `name`; None (and a warning) if none is."""
        if name not in self.sections:
            section = self.extra.get(name) or plugins.settings_section(name)
            if section is not None and section.name != name:
                raise ConfigurationError(
                    f"[{name}] ({where}) is not a settings section: the {name} plugin reads "
                    f"[{section.name}]; use [{section.name}] / "
                    f"{ENV_PREFIX}{(section.name or '').upper()}__<NAME>"
                )
            if section is None:
                names = sorted({*plugins.installed(plugins.SETTINGS), *self.extra})
                self.warnings.append(
                    f"no installed plugin reads a [{name}] section ({where}){suggest(name, names)};"
                    f" its settings are ignored (installed sections: {', '.join(names) or 'none'})"
                )
            self.sections[name] = section
        return self.sections[name]

    def layer(self, given: Iterable[tuple[str, str, Any]]) -> dict[str, Given]:
        """Each (dynaconf key, source, value) with its declaration, by key: "name", "section.name",
        any deeper part one key of a table (MILLPOND_KOMBU__TRANSPORT_OPTIONS__REGION is one key of
        kombu.transport_options). An unknown core name from the environment (shared with other
        installs) is a warning, any other unknown name an error."""
        found: dict[str, Given] = {}
        for path, source, value in given:
            section_name, dot, name = path.lower().replace("__", ".").partition(".")
            section = self.section(section_name, source) if dot else CORE
            name = name.partition(".")[0] if dot else section_name
            if section is None:
                continue
            if (opt := section.option(name)) is not None:
                found[path] = (section, opt, source, value)
            elif dot or not source.startswith("env ") or name in MOVED:
                raise section.unknown(name, source)
            else:
                self.warnings.append(f"{section.unknown(name, source)}; ignored")
        return found


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    file: Path | str | None = None,
    code: Mapping[str, Any] | None = None,
    sections: Iterable[Section] = (),
) -> Settings:
    """Read, merge and validate every source; raises ConfigurationError naming the bad setting.

    `env` is os.environ by default; a None flag is not given; `code` is what `Millpond(...)` was
    given, a plugin's section as a mapping (`redis={"lease_timeout": 10}`); `sections` adds
    declarations not installed as entry points (tests, embedding). Each layer keeps the value as
    written and its source: dynaconf's history has a nested env key as its whole merged table."""
    from dynaconf import Dynaconf, ValidationError, Validator
    from dynaconf.utils.inspect import get_history

    env = os.environ if env is None else env
    path = Path(file) if file is not None else settings_file(env)
    try:
        # the environment comes from `env`, not from dynaconf's loader (it reads os.environ only)
        conf = Dynaconf(
            settings_files=[str(path.resolve())] if path else [],
            core_loaders=["TOML"],
            environments=False,
            load_dotenv=False,
            envvar_prefix=False,
            loaders=[],
            includes=[],
            preload=[],
        )
        conf.as_dict()  # dynaconf loads lazily: read the file now, inside this `try`
    except Exception as exc:
        raise ConfigurationError(f"cannot read settings file {path}: {exc}") from exc
    found = _Declarations(sections)
    read = get_history(conf, filter_callable=lambda s: s.loader == "toml")
    layers = {
        "file": found.layer((k, f"file {path}", v) for e in read for k, v in _flat(e["value"])),
        "code": found.layer((k, "code", v) for k, v in _flat(code or {})),
        "env": found.layer(
            (variable[len(ENV_PREFIX) :], f"env {variable}", text)
            for variable, text in env.items()
            if variable.startswith(ENV_PREFIX) and variable not in META_ENV
        ),
        "flag": found.layer((k, "flag", v) for k, v in _flat(flags or {}) if v is not None),
    }
    given: dict[str, Given] = {}  # each setting's winning value
    for kind, layer in layers.items():  # lowest first: a later source wins
        given.update((s.key(o.name), (s, o, src, v)) for s, o, src, v in layer.values())
        conf.update(
            {p.upper(): _stored(o, src, v, conf) for p, (_s, o, src, v) in layer.items()},
            loader_identifier=kind,
        )
    cast: dict[str, Any] = {}

    def validator(key: str, section: Section, opt: Option, source: str, typed: Any) -> Validator:
        def check(value: Any) -> Any:
            try:
                cast[key] = section.cast(opt, value, source, typed=typed)
            except ConfigurationError as exc:
                raise ValidationError(str(exc)) from None
            return _keep_text(cast[key])  # dynaconf stores what a cast returns

        return Validator(key, cast=check, description=opt.help)

    conf.validators.register(*(validator(key, *held) for key, held in given.items()))
    try:
        conf.validators.validate_all()
    except ValidationError as exc:
        problems = [message for _validator, message in exc.details] or [str(exc)]
        many = f"{len(problems)} settings are invalid:\n  " if len(problems) > 1 else ""
        raise ConfigurationError(many + "\n  ".join(problems)) from None
    core = {opt.name: cast.get(opt.name, opt.default) for opt in CORE.options}
    values = {
        name: MappingProxyType(
            {o.name: cast.get(s.key(o.name), copy.copy(o.default)) for o in s.options}
        )
        for name, s in found.sections.items()
        if s
    }
    sources = {**dict.fromkeys(core, "default"), **{k: held[2] for k, held in given.items()}}
    return Settings(
        **core,
        sections=MappingProxyType(values),
        sources=MappingProxyType(sources),
        warnings=tuple(found.warnings),
    )
