"""Finding and loading plugins through stevedore, the one loader.

stevedore lists a group from its cache without importing anything and imports only the names
asked for: importing every plugin would import gevent into a threads worker. Its entry points
carry no distribution, so the one that declares a plugin (name, version, `Requires-Dist:
millpond ...` range) comes from `importlib.metadata`; `packaging` checks the range before the
module is imported, so one built for another core says so instead of running its import-time code
against a core it does not know or failing later with an AttributeError. `millpond_cli.bootstrap`
reads `millpond.patches` with the standard library alone: it runs before stevedore may be imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Sequence
from importlib.metadata import Distribution, EntryPoint, PackageNotFoundError
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from stevedore import NamedExtensionManager

from millpond import __version__
from millpond.config.options import Section
from millpond.contracts.backend import ResultBackend
from millpond.contracts.broker import Broker
from millpond.contracts.canvas import Canvas
from millpond.contracts.component import WorkerComponent
from millpond.contracts.hooks import Hooks
from millpond.contracts.pool import BasePool
from millpond.exceptions import PluginLoadError, PluginNotFound

POOLS = "millpond.pools"
BROKERS = "millpond.brokers"
BACKENDS = "millpond.backends"
PATCHES = "millpond.patches"
HOOKS = "millpond.hooks"
SETTINGS = "millpond.settings"
LIMITERS = "millpond.limiters"
COMMANDS = "millpond.commands"
COMPONENTS = "millpond.components"
CLIENTS = "millpond.clients"  # app attributes (`app.control`): factories called with the app
CANVAS = "millpond.canvas"  # chains, groups, chords (contracts.canvas), the one name `canvas`


class Group(NamedTuple):
    kind: str  # the word for one of its plugins, in messages
    title: str  # its heading in `millpond plugins`
    base: type | None = None  # the class its entry points must name a subclass of


#: every plugin group, in the order `millpond plugins` lists them
GROUPS = {
    POOLS: Group("pool", "pools", BasePool),
    BROKERS: Group("broker", "brokers", Broker),
    BACKENDS: Group("result backend", "result backends", ResultBackend),
    LIMITERS: Group("shared rate limiter", "shared rate limiters"),
    HOOKS: Group("hooks", "hooks", Hooks),
    SETTINGS: Group("settings section", "settings sections"),
    PATCHES: Group("early patch", "early patches"),
    COMMANDS: Group("command", "commands"),
    COMPONENTS: Group("worker component", "worker components", WorkerComponent),
    CLIENTS: Group("app client", "app clients"),
    CANVAS: Group("canvas", "canvas", Canvas),
}

_POOL_NAMES = "solo threads prefork gevent eventlet asyncio"
_REDIS = "redis rediss redis+sentinel redis-cluster rediss-cluster"
#: the first-party distribution of each name a user may ask for while it is not installed, for
#: "pip install ..." hints
FIRST_PARTY = {
    (group, name): package
    for group, package, names in [
        *((POOLS, f"millpond-pool-{p}", p) for p in _POOL_NAMES.split()),
        (BROKERS, "millpond-broker-redis", _REDIS),
        (BROKERS, "millpond-broker-amqp", "amqp amqps pyamqp"),
        (BROKERS, "millpond-broker-postgres", "postgresql postgres"),
        (BROKERS, "millpond-broker-embedded", "memory sqlite"),
        (BACKENDS, "millpond-broker-embedded", "memory sqlite"),
        (BACKENDS, "millpond-broker-redis", "redis rediss redis-cluster rediss-cluster"),
        (BACKENDS, "millpond-broker-amqp", "rpc"),
        (BACKENDS, "millpond-broker-postgres", "postgresql postgres"),
        (LIMITERS, "millpond-broker-redis", _REDIS),
        (COMMANDS, "millpond-beat", "beat"),  # `millpond worker -B`
        (CLIENTS, "millpond-control", "control"),
        (HOOKS, "millpond-tracing", "tracing"),
        (HOOKS, "millpond-health", "health"),
        (HOOKS, "millpond-metrics", "metrics"),
        (HOOKS, "millpond-control", "events"),
    ]
    for name in names.split()
}


def entry_points(group: str) -> list[EntryPoint]:
    """The group's installed entry points, sorted by name, read from stevedore's cache."""
    lister: NamedExtensionManager[Any] = NamedExtensionManager(group, names=[])
    return sorted(lister.list_entry_points(), key=lambda ep: ep.name)


def installed(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group)})


class PluginInfo(NamedTuple):
    """One installed entry point and the distribution that declares it, from metadata alone."""

    group: str
    name: str
    distribution: str
    version: str
    core_range: str  # the core versions it requires (">=0.1,<0.2"), "" for none


@functools.cache
def describe(ep: EntryPoint) -> PluginInfo:
    """`ep` with its distribution: first the one named like its top-level package (as every
    first-party plugin's and the scaffold's is), since scanning all costs ms per worker start."""
    try:
        dist = importlib.metadata.distribution(ep.module.partition(".")[0])
    except (PackageNotFoundError, ValueError):
        dist = None
    if dist is None or ep not in dist.entry_points:
        found = importlib.metadata.entry_points(group=ep.group, name=ep.name, value=ep.value)
        dist = next((e.dist for e in found if e.dist is not None), None)
    if dist is None:
        return PluginInfo(ep.group, ep.name, "?", "?", "")
    name = dist.metadata["Name"] or "?"
    return PluginInfo(ep.group, ep.name, name, dist.version, _core_range(dist))


def _core_range(dist: Distribution) -> str:
    for line in dist.requires or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != "millpond":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # only with an extra
        # lower bounds first, as people write them (a SpecifierSet's own text is sorted)
        clauses = sorted(requirement.specifier, key=lambda c: (c.operator[0] in "<!", str(c)))
        return ",".join(str(c) for c in clauses)
    return ""


def load(group: str, name: str) -> Any:
    """The object an installed entry point names, imported through stevedore and checked."""
    return load_all(group, [name])[0][1]


def load_all(group: str, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """(name, object) for every installed extension of a group, or for `names` in that order,
    each checked against its core range before it is imported, then against its group's contract;
    a missing name, one that cannot be imported or one two distributions declare raises."""
    wanted = list(names) if names is not None else installed(group)
    for info in (describe(ep) for ep in entry_points(group) if ep.name in wanted):
        if not SpecifierSet(info.core_range).contains(__version__, prereleases=True):
            raise PluginLoadError(
                f"{GROUPS[group].kind} {info.name!r} from {info.distribution} {info.version} "
                f"needs millpond{info.core_range}, but millpond {__version__} is installed; "
                "upgrade one of them so they match"
            )
    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        group,
        names=wanted,
        name_order=True,
        on_load_failure_callback=_raise_load_failure,
        on_missing_entrypoints_callback=lambda missing: _raise_missing(group, sorted(missing)),
        conflict_resolver=_raise_conflict,
    )
    for ext in manager.extensions:
        _verify(group, ext.name, ext.plugin)
    return [(ext.name, ext.plugin) for ext in manager.extensions]


def _verify(group: str, name: str, obj: Any) -> None:
    """Refuse an entry point whose object is not what its group promises."""
    what = ""
    if base := GROUPS[group].base:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            what = f"does not name a {base.__name__} subclass"
    elif group == SETTINGS and not (isinstance(obj, Section) and obj.name):
        what = "does not name a millpond Section with a name"
    elif group in (PATCHES, CLIENTS) and not callable(obj):
        what = "is not callable"
    if what:
        raise PluginLoadError(f"the {GROUPS[group].kind} {name!r} {what}: {obj!r}")


def _raise_missing(group: str, names: list[str]) -> None:
    have = ", ".join(installed(group)) or "none"
    package = FIRST_PARTY.get((group, names[0]))
    hint = f"; install it with: pip install {package}" if package else ""
    if group == HOOKS:
        hint = f"{hint}, or fix the hooks setting" if package else "; fix the hooks setting"
    shown = ", ".join(repr(n) for n in names)
    raise PluginNotFound(
        f"no {GROUPS[group].kind} named {shown} is installed (installed: {have}){hint}"
    )


def _raise_load_failure(_manager: Any, ep: EntryPoint, err: BaseException) -> None:
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, ImportError) and err.name:
        detail = f"{err.name} is not installed or cannot be imported ({err})"
    kind = GROUPS[ep.group].kind
    raise PluginLoadError(f"the {kind} plugin {ep.name!r} cannot be loaded: {detail}") from err


def _raise_conflict(group: str, name: str, extensions: list[Any]) -> Any:
    owners = ", ".join(sorted(describe(e.entry_point).distribution for e in extensions))
    raise PluginLoadError(
        f"several installed distributions declare a {GROUPS[group].kind} named {name!r} "
        f"({owners}); uninstall all but one"
    )


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise PluginNotFound(f"{url!r} is not a URL: expected scheme://..., e.g. redis://localhost")
    return scheme


def broker_for_url(url: str, options: dict[str, Any] | None = None) -> Broker:
    return cast(Broker, load(BROKERS, scheme_of(url))(url, options))


def backend_for_url(url: str, options: dict[str, Any] | None = None) -> ResultBackend:
    return cast(ResultBackend, load(BACKENDS, scheme_of(url))(url, options))


def load_hooks(names: Sequence[str]) -> list[Hooks]:
    """The hooks implementations `names` asks for (`*`: every installed one), built, in order."""
    return [cls() for _name, cls in load_all(HOOKS, None if "*" in names else names)]


def canvas_class() -> type[Canvas]:
    """The installed `Canvas` subclass, else the base one, whose methods say to install it."""
    return load(CANVAS, "canvas") if "canvas" in installed(CANVAS) else Canvas


@functools.cache
def settings_section(name: str) -> Section | None:
    """The settings section published under `name` (a pool's name, or a URL scheme its broker
    serves); None when no installed plugin publishes one."""
    return load(SETTINGS, name) if name in installed(SETTINGS) else None
