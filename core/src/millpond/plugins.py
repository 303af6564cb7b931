"""Finding and loading plugins: pools, brokers, result backends, early patches, settings sections.

Only the configured name is ever imported (importing every installed plugin would import gevent and
eventlet into a threads worker). A missing name is a clear error that lists what is installed and
the package to install; a plugin that cannot be imported, or that was built for another core
version, says so at load time instead of failing with an AttributeError later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import Distribution, EntryPoint, PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

from millpond.exceptions import PluginLoadError, PluginNotFound

POOLS = "millpond.pools"
BROKERS = "millpond.brokers"
BACKENDS = "millpond.backends"
PATCHES = "millpond.patches"
SETTINGS = "millpond.settings"

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
    (BROKERS, "amqp"): "millpond-broker-amqp",
    (BROKERS, "amqps"): "millpond-broker-amqp",
    (BROKERS, "pyamqp"): "millpond-broker-amqp",
    (BACKENDS, "redis"): "millpond-broker-redis",
    (BACKENDS, "rediss"): "millpond-broker-redis",
    (BACKENDS, "rpc"): "millpond-broker-amqp",
}
_KIND = {POOLS: "pool", BROKERS: "broker", BACKENDS: "result backend", PATCHES: "patch"}


def _entry_points(group: str) -> list[EntryPoint]:
    from millpond._bootstrap import entry_points_by_group

    seen: dict[str, EntryPoint] = {}
    for ep in entry_points_by_group().get(group, []):
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda ep: ep.name)


def installed(group: str) -> list[str]:
    return [ep.name for ep in _entry_points(group)]


_SIMPLE_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\d+(?:\.\d+)*)\s*$")


def _release(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^(\d+(?:\.\d+)*)$", text.strip())
    if not match:
        return None
    parts = tuple(int(p) for p in match.group(1).split("."))
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def _satisfies(version_text: str, specifier: str) -> bool:
    """Whether a version meets a specifier such as ">=0.1,<0.2".

    Plain release numbers and comparison operators are checked here; anything else (pre-releases,
    ~=, wildcards) goes to `packaging`, whose import costs tens of milliseconds at start-up.
    """
    have = _release(version_text)
    clauses = [c for c in specifier.split(",") if c.strip()]
    parsed = [_SIMPLE_CLAUSE.match(c) for c in clauses]
    if have is None or not all(parsed):
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return SpecifierSet(specifier).contains(Version(version_text), prereleases=True)
    checks = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
    }
    for match in parsed:
        assert match is not None
        want = _release(match.group(2))
        assert want is not None
        if not checks[match.group(1)](have, want):
            return False
    return True


_REQUIRES_CORE = re.compile(
    r"^\s*millpond(?![\w.-])\s*(?:\[[^\]]*\])?\s*\(?\s*([^;()]*?)\s*\)?\s*(;.*)?$"
)


def _check_core_version(dist: Distribution | None, what: str) -> None:
    """Refuse a plugin whose declared range of core versions excludes this core."""
    if dist is None or dist.metadata["Name"] == "millpond":
        return
    core = core_version()
    for line in dist.requires or []:
        match = _REQUIRES_CORE.match(line)
        if match is None or match.group(2):  # another package, or only under a marker (extras)
            continue
        specifier = match.group(1)
        if specifier and not _satisfies(core, specifier):
            raise PluginLoadError(
                f"{what} from {dist.metadata['Name']} {dist.version} needs millpond{specifier}, "
                f"but millpond {core} is installed; upgrade one of them so they match"
            )


def load(group: str, name: str) -> Any:
    """The object an entry point names, loaded through stevedore."""
    from stevedore import DriverManager
    from stevedore.exception import NoMatches

    kind = _KIND.get(group, group)
    matches = [ep for ep in _entry_points(group) if ep.name == name]
    if not matches:
        names = installed(group)
        have = ", ".join(names) if names else "none"
        package = FIRST_PARTY.get((group, name))
        hint = f"; install it with: pip install {package}" if package else ""
        raise PluginNotFound(f"no {kind} named {name!r} is installed (installed: {have}){hint}")
    _check_core_version(matches[0].dist, f"{kind} {name!r}")
    try:
        manager = DriverManager(
            namespace=group,
            name=name,
            invoke_on_load=False,
            on_load_failure_callback=_raise_load_failure,
        )
    except NoMatches:
        raise PluginNotFound(f"no {kind} named {name!r} could be loaded")
    except PluginLoadError:
        raise
    except Exception as exc:
        raise PluginLoadError(f"the {kind} plugin {name!r} cannot be loaded: {exc}") from exc
    return manager.driver


def _raise_load_failure(_manager: Any, ep: Any, err: BaseException) -> None:
    kind = _KIND.get(getattr(ep, "group", ""), "plugin")
    module = getattr(err, "name", None)
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, ImportError) and module:
        detail = f"{module} is not installed or cannot be imported ({err})"
    raise PluginLoadError(f"the {kind} plugin {ep.name!r} cannot be loaded: {detail}") from err


def pool_class(name: str) -> Any:
    from millpond.pool import BasePool

    cls = load(POOLS, name)
    if not (isinstance(cls, type) and issubclass(cls, BasePool)):
        raise PluginLoadError(
            f"the pool plugin {name!r} does not name a BasePool subclass: {cls!r}"
        )
    return cls


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise PluginNotFound(f"{url!r} is not a URL: expected scheme://..., e.g. redis://localhost")
    return scheme


def broker_for_url(url: str, options: dict[str, Any] | None = None) -> Any:
    from millpond.broker import Broker

    cls = load(BROKERS, scheme_of(url))
    if not (isinstance(cls, type) and issubclass(cls, Broker)):
        raise PluginLoadError(f"the broker plugin for {scheme_of(url)!r} is not a Broker: {cls!r}")
    return cls(url, options)


def backend_for_url(url: str, options: dict[str, Any] | None = None) -> Any:
    from millpond.broker import ResultBackend

    cls = load(BACKENDS, scheme_of(url))
    if not (isinstance(cls, type) and issubclass(cls, ResultBackend)):
        raise PluginLoadError(f"the backend plugin {scheme_of(url)!r} is not a ResultBackend")
    return cls(url, options)


def run_patch(pool: str) -> bool:
    """Run the pool's early monkey-patch, if it declares one; returns whether one ran."""
    for ep in _entry_points(PATCHES):
        if ep.name == pool:
            patch = ep.load()
            patch()
            return True
    return False


@dataclass(frozen=True, slots=True)
class PluginInfo:
    group: str
    name: str
    distribution: str
    version: str
    loads: bool
    error: str = ""


def describe_installed(groups: tuple[str, ...] = (POOLS, BROKERS, BACKENDS)) -> list[PluginInfo]:
    """Every installed plugin with its distribution, version and whether it loads.

    Uses importlib.metadata directly: stevedore's cached entry points carry no distribution.
    Trying to load a green pool here would monkey-patch nothing (patching is a separate entry point)
    but does import gevent; that is acceptable for a listing command.
    """
    out: list[PluginInfo] = []
    for group in groups:
        for ep in _entry_points(group):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist else "?"
            dist_version = dist.version if dist else "?"
            try:
                _check_core_version(dist, f"{_KIND.get(group, group)} {ep.name!r}")
                ep.load()
                out.append(PluginInfo(group, ep.name, dist_name, dist_version, True))
            except Exception as exc:
                out.append(
                    PluginInfo(
                        group,
                        ep.name,
                        dist_name,
                        dist_version,
                        False,
                        f"{type(exc).__name__}: {exc}",
                    )
                )
    return out


def core_version() -> str:
    try:
        return version("millpond")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
