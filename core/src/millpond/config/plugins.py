"""Finding and loading plugins through stevedore: pools, brokers, result backends, early patches,
hooks and settings sections.

stevedore is the one loader. It lists a group's entry points from its cache without importing
anything, and imports only the names asked for: importing every installed plugin would import
gevent and eventlet into a threads worker. A missing name is a clear error that lists what is
installed and the package to install; a plugin that cannot be imported, or that declares a range of
core versions this core is not in, says so when it is loaded instead of failing with an
AttributeError later.

stevedore's entry points carry no distribution, so the distribution that declared one (its name,
version and `Requires-Dist: millpond ...` range) comes from `importlib.metadata`, read once per
process, and the range is checked with `packaging`.

`millpond_cli.bootstrap` has its own, stdlib-only lookup of the `millpond.patches` group: it runs
before this module (or stevedore, or logging) may be imported; see its docstring.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import Distribution, EntryPoint, PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from millpond.exceptions import PluginLoadError, PluginNotFound

if TYPE_CHECKING:
    from millpond.config.options import Section

POOLS = "millpond.pools"
BROKERS = "millpond.brokers"
BACKENDS = "millpond.backends"
PATCHES = "millpond.patches"
HOOKS = "millpond.hooks"
SETTINGS = "millpond.settings"
#: shared rate limiters (global rate limits), a URL scheme each; millpond-ratelimit loads them
LIMITERS = "millpond.limiters"
COMMANDS = "millpond.commands"
#: parts of the worker a plugin adds (contracts.component): the control plane, rate limits
COMPONENTS = "millpond.components"
#: objects an app offers as attributes (`app.control`), each a factory called with the app
CLIENTS = "millpond.clients"
#: chains, groups, chords and callbacks (contracts.canvas), under the one name `canvas`
CANVAS = "millpond.canvas"
#: every group, in the order `millpond plugins` lists them
GROUPS = (
    POOLS,
    BROKERS,
    BACKENDS,
    LIMITERS,
    HOOKS,
    SETTINGS,
    PATCHES,
    COMMANDS,
    COMPONENTS,
    CLIENTS,
    CANVAS,
)

#: the first-party package for each well-known name, for "pip install ..." hints
FIRST_PARTY = {
    (POOLS, "solo"): "millpond-pool-solo",
    (POOLS, "threads"): "millpond-pool-threads",
    (POOLS, "prefork"): "millpond-pool-prefork",
    (POOLS, "gevent"): "millpond-pool-gevent",
    (POOLS, "eventlet"): "millpond-pool-eventlet",
    (POOLS, "asyncio"): "millpond-pool-asyncio",
    (BROKERS, "redis"): "millpond-broker-redis",
    (BROKERS, "rediss"): "millpond-broker-redis",
    (BROKERS, "redis+sentinel"): "millpond-broker-redis",
    (BROKERS, "redis-cluster"): "millpond-broker-redis",
    (BROKERS, "rediss-cluster"): "millpond-broker-redis",
    (BROKERS, "amqp"): "millpond-broker-amqp",
    (BROKERS, "amqps"): "millpond-broker-amqp",
    (BROKERS, "pyamqp"): "millpond-broker-amqp",
    (BROKERS, "postgresql"): "millpond-broker-postgres",
    (BROKERS, "postgres"): "millpond-broker-postgres",
    (BROKERS, "memory"): "millpond-broker-embedded",
    (BROKERS, "sqlite"): "millpond-broker-embedded",
    (BACKENDS, "memory"): "millpond-broker-embedded",
    (BACKENDS, "sqlite"): "millpond-broker-embedded",
    (BACKENDS, "redis"): "millpond-broker-redis",
    (BACKENDS, "rediss"): "millpond-broker-redis",
    (BACKENDS, "redis-cluster"): "millpond-broker-redis",
    (BACKENDS, "rediss-cluster"): "millpond-broker-redis",
    (BACKENDS, "rpc"): "millpond-broker-amqp",
    (BACKENDS, "postgresql"): "millpond-broker-postgres",
    (BACKENDS, "postgres"): "millpond-broker-postgres",
    (LIMITERS, "redis"): "millpond-broker-redis",
    (LIMITERS, "rediss"): "millpond-broker-redis",
    (LIMITERS, "redis+sentinel"): "millpond-broker-redis",
    (LIMITERS, "redis-cluster"): "millpond-broker-redis",
    (LIMITERS, "rediss-cluster"): "millpond-broker-redis",
    (COMMANDS, "beat"): "millpond-beat",
    (COMMANDS, "inspect"): "millpond-control",
    (COMMANDS, "control"): "millpond-control",
    (COMMANDS, "events"): "millpond-control",
    (COMPONENTS, "control"): "millpond-control",
    (COMPONENTS, "ratelimit"): "millpond-ratelimit",
    (CLIENTS, "control"): "millpond-control",
    (CANVAS, "canvas"): "millpond-canvas",
}
#: names people try that no first-party plugin serves, with what to do instead
UNSUPPORTED: dict[tuple[str, str], str] = {}
#: each group's word for one of its plugins (in messages), and its title in `millpond plugins`
NAMES = {
    POOLS: ("pool", "pools"),
    BROKERS: ("broker", "brokers"),
    BACKENDS: ("result backend", "result backends"),
    LIMITERS: ("shared rate limiter", "shared rate limiters"),
    PATCHES: ("early patch", "early patches"),
    HOOKS: ("hooks", "hooks"),
    SETTINGS: ("settings section", "settings sections"),
    COMMANDS: ("command", "commands"),
    COMPONENTS: ("worker component", "worker components"),
    CLIENTS: ("app client", "app clients"),
    CANVAS: ("canvas", "canvas"),
}
KIND = {group: one for group, (one, _title) in NAMES.items()}


# -- what is installed (nothing imported) ----------------------------------------------------------


def entry_points(group: str) -> list[EntryPoint]:
    """The group's installed entry points, sorted by name, read from stevedore's cache."""
    from stevedore import NamedExtensionManager

    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        group, names=[], on_missing_entrypoints_callback=None
    )
    return sorted(manager.list_entry_points(), key=lambda ep: ep.name)


def installed(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group)})


@functools.cache
def _owners() -> dict[tuple[str, str, str], Distribution]:
    """(group, name, value) -> the distribution declaring that entry point, for every group."""
    from importlib.metadata import entry_points as declared

    found: dict[tuple[str, str, str], Distribution] = {}
    everything = declared()
    for group in GROUPS:
        for ep in everything.select(group=group):
            if ep.dist is not None:
                found.setdefault((ep.group, ep.name, ep.value), ep.dist)
    return found


@functools.cache
def _named(package: str) -> Distribution | None:
    try:
        return importlib.metadata.distribution(package)
    except (PackageNotFoundError, ValueError):
        return None


@functools.cache
def _distribution(group: str, name: str, value: str) -> Distribution | None:
    named = _named(value.partition(":")[0].partition(".")[0])
    if named is not None and any(
        (e.group, e.name, e.value) == (group, name, value) for e in named.entry_points
    ):
        return named
    return _owners().get((group, name, value))


def distribution(ep: EntryPoint) -> Distribution | None:
    """The installed distribution that declares this entry point.

    Tried first: the distribution named like the entry point's top-level package (how every
    first-party plugin and the scaffold's are named), kept only if it does declare this entry
    point. That reads one distribution's metadata, where scanning every installed one to map entry
    points to distributions costs milliseconds at each worker start; the scan is the fallback.
    Looked up once per entry point and process.
    """
    return _distribution(ep.group, ep.name, ep.value)


def core_range(dist: Distribution | None) -> str:
    """The range of core versions a plugin's distribution declares (`Requires-Dist: millpond
    >=0.1,<0.2`), "" when it declares none (or is the core itself)."""
    if dist is None or _canonical(dist.metadata["Name"] or "") == "millpond":
        return ""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in dist.requires or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if _canonical(requirement.name) != "millpond":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # only with an extra
        # lower bounds first, as people write them (a SpecifierSet's own text is sorted)
        clauses = sorted(requirement.specifier, key=lambda c: (c.operator[0] in "<!", str(c)))
        return ",".join(str(c) for c in clauses)
    return ""


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def _check_core_version(ep: EntryPoint, what: str) -> None:
    """Refuse a plugin whose declared range of core versions excludes this core."""
    dist = distribution(ep)
    wanted = core_range(dist)
    if not wanted or dist is None:
        return
    from packaging.specifiers import SpecifierSet

    core = core_version()
    if not SpecifierSet(wanted).contains(core, prereleases=True):
        raise PluginLoadError(
            f"{what} from {dist.metadata['Name']} {dist.version} needs millpond{wanted}, "
            f"but millpond {core} is installed; upgrade one of them so they match"
        )


# -- loading ---------------------------------------------------------------------------------------


def _find(group: str, name: str) -> EntryPoint:
    for ep in entry_points(group):
        if ep.name == name:
            return ep
    names = installed(group)
    have = ", ".join(names) if names else "none"
    package = FIRST_PARTY.get((group, name))
    hint = f"; install it with: pip install {package}" if package else ""
    if (group, name) in UNSUPPORTED:
        hint = f"; {UNSUPPORTED[(group, name)]}"
    raise PluginNotFound(
        f"no {KIND.get(group, group)} named {name!r} is installed (installed: {have}){hint}"
    )


def load(group: str, name: str) -> Any:
    """The object an installed entry point names, imported through stevedore."""
    from stevedore import DriverManager
    from stevedore.exception import MultipleMatches, NoMatches

    kind = KIND.get(group, group)
    _check_core_version(_find(group, name), f"{kind} {name!r}")
    try:
        manager: DriverManager[Any] = DriverManager(
            namespace=group, name=name, on_load_failure_callback=_raise_load_failure
        )
    except NoMatches:
        raise PluginNotFound(f"no {kind} named {name!r} could be loaded")
    except MultipleMatches:
        owners = [distribution(ep) for ep in entry_points(group) if ep.name == name]
        names = ", ".join(sorted(d.metadata["Name"] for d in owners if d is not None))
        raise PluginLoadError(
            f"several installed distributions declare a {kind} named {name!r} ({names}); "
            "uninstall all but one"
        ) from None
    return manager.driver


def load_all(group: str, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """(name, object) for every installed extension of a group, or for `names` in that order;
    a missing name or one that cannot be loaded raises, naming it."""
    from stevedore import NamedExtensionManager
    from stevedore.extension import error_on_conflict

    wanted = list(names) if names is not None else installed(group)
    for name in wanted:
        _check_core_version(_find(group, name), f"{KIND.get(group, group)} {name!r}")
    if not wanted:
        return []
    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        group,
        names=wanted,
        name_order=True,
        on_load_failure_callback=_raise_load_failure,
        on_missing_entrypoints_callback=None,
        conflict_resolver=error_on_conflict,
    )
    return [(ext.name, ext.plugin) for ext in manager.extensions]


def _raise_load_failure(_manager: Any, ep: EntryPoint, err: BaseException) -> None:
    kind = KIND.get(ep.group, "plugin")
    module = getattr(err, "name", None)
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, ImportError) and module:
        detail = f"{module} is not installed or cannot be imported ({err})"
    raise PluginLoadError(f"the {kind} plugin {ep.name!r} cannot be loaded: {detail}") from err


def pool_class(name: str) -> Any:
    cls = load(POOLS, name)
    _verify(POOLS, name, cls)
    return cls


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise PluginNotFound(f"{url!r} is not a URL: expected scheme://..., e.g. redis://localhost")
    return scheme


def broker_for_url(url: str, options: dict[str, Any] | None = None) -> Any:
    scheme = scheme_of(url)
    cls = load(BROKERS, scheme)
    _verify(BROKERS, scheme, cls)
    return cls(url, options)


def backend_for_url(url: str, options: dict[str, Any] | None = None) -> Any:
    scheme = scheme_of(url)
    cls = load(BACKENDS, scheme)
    _verify(BACKENDS, scheme, cls)
    return cls(url, options)


def command(name: str) -> Any:
    """The installed subcommand `name` (a `millpond.contracts.command.Command`), loaded."""
    found = load(COMMANDS, name)
    _verify(COMMANDS, name, found)
    return found


def components() -> list[tuple[str, Any]]:
    """(name, class) of every installed worker component, each checked against the contract."""
    found = load_all(COMPONENTS)
    for name, cls in found:
        _verify(COMPONENTS, name, cls)
    return found


def client(name: str) -> Any:
    """The factory an app calls for the attribute `name` (`app.control`); checked callable."""
    found = load(CLIENTS, name)
    _verify(CLIENTS, name, found)
    return found


def canvas_class() -> Any:
    """The installed `Canvas` subclass (contracts.canvas), or None when none is installed."""
    if "canvas" not in installed(CANVAS):
        return None
    cls = load(CANVAS, "canvas")
    _verify(CANVAS, "canvas", cls)
    return cls


def has_patch(pool: str) -> bool:
    """Whether the pool declares an early monkey-patch (nothing imported)."""
    return pool in installed(PATCHES)


def run_patch(pool: str) -> bool:
    """Run the pool's early monkey-patch, if it declares one; returns whether one ran."""
    if not has_patch(pool):
        return False
    patch = load(PATCHES, pool)
    _verify(PATCHES, pool, patch)
    patch()
    return True


_sections: dict[str, Section | None] = {}


def settings_section(name: str) -> Section | None:
    """The settings section published under `name` (a pool's name, or a URL scheme its broker
    serves), loaded; None when no installed plugin publishes one under that name."""
    if name not in _sections:
        found = None
        if name in installed(SETTINGS):
            found = load(SETTINGS, name)
            _verify(SETTINGS, name, found)
        _sections[name] = found
    return _sections[name]


def installed_sections() -> list[tuple[Section, str]]:
    """(section, distribution name) for every installed plugin section, once each (a section
    published under several names, one per URL scheme, is listed once), sorted by name."""
    found: dict[str, tuple[Section, str]] = {}
    for ep in entry_points(SETTINGS):
        section = settings_section(ep.name)
        assert section is not None  # it is installed, and _verify checked it has a name
        assert section.name
        dist = distribution(ep)
        found.setdefault(section.name, (section, dist.metadata["Name"] if dist else "?"))
    return [found[name] for name in sorted(found)]


def _verify(group: str, name: str, obj: Any) -> None:
    """Refuse an entry point whose object is not what its group promises."""
    from millpond.config.options import Section
    from millpond.contracts.backend import ResultBackend
    from millpond.contracts.broker import Broker
    from millpond.contracts.canvas import Canvas
    from millpond.contracts.command import Command
    from millpond.contracts.component import WorkerComponent
    from millpond.contracts.pool import BasePool

    expected: dict[str, tuple[type, str]] = {
        POOLS: (BasePool, "a BasePool subclass"),
        BROKERS: (Broker, "a Broker subclass"),
        BACKENDS: (ResultBackend, "a ResultBackend subclass"),
        COMPONENTS: (WorkerComponent, "a WorkerComponent subclass"),
        CANVAS: (Canvas, "a Canvas subclass"),
    }
    kind = KIND.get(group, group)
    if group in expected:
        base, what = expected[group]
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginLoadError(f"the {kind} plugin {name!r} does not name {what}: {obj!r}")
    elif group == SETTINGS:
        if not isinstance(obj, Section) or not obj.name:
            raise PluginLoadError(
                f"the {SETTINGS} entry point {name!r} does not name a millpond Section with a "
                f"name: {obj!r}"
            )
    elif group == COMMANDS and not isinstance(obj, Command):
        raise PluginLoadError(
            f"the {COMMANDS} entry point {name!r} does not name a millpond Command instance: {obj!r}"
        )
    elif group in (PATCHES, CLIENTS) and not callable(obj):
        raise PluginLoadError(f"the {kind} {name!r} is not callable: {obj!r}")


# -- `millpond plugins` ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One installed entry point, described from metadata alone."""

    group: str
    name: str
    target: str
    distribution: str
    version: str
    #: the range of core versions the distribution declares ("" for none, or for the core)
    core_range: str


def describe_installed(groups: Sequence[str] = GROUPS) -> list[PluginInfo]:
    """Every installed plugin with its distribution, version and core range; imports none."""
    out: list[PluginInfo] = []
    for group in groups:
        for ep in entry_points(group):
            dist = distribution(ep)
            out.append(
                PluginInfo(
                    group,
                    ep.name,
                    ep.value,
                    (dist.metadata["Name"] or "?") if dist else "?",
                    dist.version if dist else "?",
                    core_range(dist),
                )
            )
    return out


def check(info: PluginInfo) -> str | None:
    """Import one plugin and check it; None when it loads, else why it does not."""
    try:
        _verify(info.group, info.name, load(info.group, info.name))
    except (PluginLoadError, PluginNotFound) as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def core_version() -> str:
    try:
        return version("millpond")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def load_hooks(names: Sequence[str]) -> list[Any]:
    """Instances of the installed hooks implementations `names` asks for (`*`: every one), in
    name order; a name that is not installed is an error naming what is. Only the hooks asked
    for are imported."""
    from millpond.contracts.hooks import Hooks

    available = installed(HOOKS)
    wanted = available if "*" in names else list(names)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise PluginNotFound(
            f"no hooks plugin named {', '.join(repr(m) for m in missing)} is installed "
            f"(installed: {', '.join(available) or 'none'}); fix the hooks setting"
        )
    out = []
    for name, cls in load_all(HOOKS, wanted):
        hook = cls()
        if not isinstance(hook, Hooks):
            raise PluginLoadError(f"the hooks plugin {name!r} is not a millpond Hooks: {hook!r}")
        out.append(hook)
    return out
