"""Celery's rate strings, the value of the `rate_limit` task option (kept by millpond-ratelimit).

Parsed when a task is declared or a limit is changed at run time, so a typo fails at import or in
the control command's reply, never inside the consumer loop.
"""

from __future__ import annotations

import math

from millpond.exceptions import ConfigurationError

#: where a task's limit is kept: in each worker (Celery's meaning) or one bucket for the fleet
RATE_LIMIT_SCOPES = ("worker", "global")
#: seconds per unit of a Celery rate string
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidRateLimit(ConfigurationError, ValueError):
    """A rate limit that is not Celery's `N`, `N/s`, `N/m` or `N/h`."""


def parse_rate(value: str | float | None) -> float | None:
    """Tokens per second for what Celery accepts (`"10/m"` -> 0.1667; `N/s`, `N/m`, `N/h`, N
    maybe a fraction, or a number per second), None for no limit (`None`, `""`, `0`); anything
    else raises `InvalidRateLimit` saying what is allowed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRateLimit(
            f"rate limit {value!r} is not a rate: use 'N/s', 'N/m', 'N/h' or a number per second"
        )
    amount, _, unit = str(value).partition("/")  # a number: per second
    unit = unit.strip().lower() or "s"
    if unit not in _UNITS:
        raise InvalidRateLimit(
            f"rate limit {value!r} has the unit {unit!r}: use s, m or h ('10/m')"
        )
    try:
        per_second = float(amount) / _UNITS[unit]
    except ValueError:
        raise InvalidRateLimit(
            f"rate limit {value!r} does not start with a number: use 'N/s', 'N/m' or 'N/h'"
        ) from None
    if not math.isfinite(per_second):
        raise InvalidRateLimit(f"rate limit {value!r} is not a finite number")
    if per_second < 0:
        raise InvalidRateLimit(f"rate limit {value!r} is negative; use 0 or None for no limit")
    return per_second or None
