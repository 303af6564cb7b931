"""The contract of a limiter shared by every worker, and rates written as people write them.

A `SharedLimiter` keeps one token bucket per name for a whole fleet (`rate_limit_scope = "global"`):
a plugin serves it for a URL scheme through the `millpond.limiters` entry-point group (the Redis
plugin does, in one atomic Lua script). The worker's consumer loop calls `acquire` only when it
holds a message waiting for a token, so an idle task costs the store nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from millpond.config import plugins
from millpond.exceptions import PluginLoadError


def describe_rate(per_second: float | None) -> str:
    """A rate as people write it (`0.1667` -> `"10/m"`), for logs and replies."""
    if not per_second:
        return "no limit"
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        count = per_second * seconds
        if count >= 1 and abs(count - round(count)) < 1e-6:
            return f"{round(count)}/{unit}"
    return f"{per_second:g}/s"


class SharedLimiter(ABC):
    """A token bucket per name, shared by every worker that uses the same store.

    Implementations must take a token atomically (two workers never both get the last one) and
    measure time with one clock for everyone (the store's, not each worker's), so skewed worker
    clocks cannot add tokens. They are used from the consumer loop's thread only.
    """

    #: URL schemes this class serves (documentation; the entry points are what is used)
    schemes: tuple[str, ...] = ()

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: Mapping[str, Any] = dict(options or {})

    @abstractmethod
    def acquire(self, name: str, rate: float, capacity: float = 1.0) -> float:
        """Take one token from the bucket `name` (refilled at `rate` tokens per second, holding
        at most `capacity`). Returns 0.0 when a token was taken, otherwise the seconds until one
        may be there (nothing is taken then). Raises on a store it cannot reach: the worker keeps
        the message waiting and asks again later (a shared limit fails closed)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def limiter_for_url(url: str, options: Mapping[str, Any] | None = None) -> SharedLimiter:
    """The shared limiter an installed plugin serves for the URL's scheme."""
    scheme = plugins.scheme_of(url)
    cls = plugins.load(plugins.LIMITERS, scheme)
    if not (isinstance(cls, type) and issubclass(cls, SharedLimiter)):
        raise PluginLoadError(
            f"the shared rate limiter plugin {scheme!r} does not name a SharedLimiter "
            f"subclass: {cls!r}"
        )
    return cls(url, options)
