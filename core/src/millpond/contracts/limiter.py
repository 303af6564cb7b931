"""Rate limits: Celery's rate strings, and the contract of a limiter shared by every worker.

A rate is what Celery's `rate_limit` task option takes: `"10/s"`, `"10/m"`, `"10/h"`, or a plain
number (per second; text or a number). It is parsed here once, when a task is declared or a limit is
changed at run time, so a typo fails at import or in the control command's reply, never at 3 a.m.
inside the consumer loop. `0` and empty mean "no limit", as in Celery.

A `SharedLimiter` keeps one token bucket per name for a whole fleet (`rate_limit_scope = "global"`):
a plugin serves it for a URL scheme through the `millpond.limiters` entry-point group (the Redis
plugin does, in one atomic Lua script). The worker's consumer loop calls `acquire` only when it
holds a message waiting for a token, so an idle task costs the store nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from millpond.exceptions import ConfigurationError

#: where a task's limit is kept: in each worker (Celery's meaning) or one bucket for the fleet
RATE_LIMIT_SCOPES = ("worker", "global")
#: seconds per unit of a Celery rate string
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidRateLimit(ConfigurationError, ValueError):
    """A rate limit that is not Celery's `N`, `N/s`, `N/m` or `N/h`."""


def parse_rate(value: str | float | None) -> float | None:
    """Tokens per second for a Celery rate (`"10/m"` -> 0.1667), None for no limit.

    Accepts what Celery accepts: `N/s`, `N/m`, `N/h` (N may have a fraction), a plain number or
    numeric text (per second), and `None`, `""` or `0` for no limit. Anything else (a negative
    number, another unit, `"ten/m"`) raises `InvalidRateLimit` saying what is allowed.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRateLimit(
            f"rate limit {value!r} is not a rate: use 'N/s', 'N/m', 'N/h' or a number per second"
        )
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        amount, _, unit = text.partition("/")
        unit = unit.strip().lower() or "s"
        if unit not in _UNITS:
            raise InvalidRateLimit(
                f"rate limit {value!r} has the unit {unit!r}: use s, m or h ('10/m')"
            )
        try:
            count = float(amount.strip())
        except ValueError:
            raise InvalidRateLimit(
                f"rate limit {value!r} does not start with a number: use 'N/s', 'N/m' or 'N/h'"
            ) from None
        per_second = count / _UNITS[unit]
    else:
        per_second = float(value)
    if not math.isfinite(per_second):
        raise InvalidRateLimit(f"rate limit {value!r} is not a finite number")
    if per_second < 0:
        raise InvalidRateLimit(f"rate limit {value!r} is negative; use 0 or None for no limit")
    return per_second or None


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
