"""Celery's task rate limits for millpond workers.

`@app.task(rate_limit="10/m")` limits the moments a task starts, per worker (Celery's meaning) or
for the whole fleet (`rate_limit_scope = "global"`, one bucket in a shared store that a
`millpond.limiters` plugin serves: millpond-broker-redis does). Limited tasks wait beside the
prefetch window, never in it, so other tasks keep flowing; `celery control rate_limit` (and
`app.control.rate_limit`) changes a limit at run time. The worker reaches this package only through
the `millpond.components` entry point `ratelimit` (see `millpond.contracts.component`).
"""

from millpond.produce.task import InvalidRateLimit, parse_rate
from millpond_ratelimit.component import RateLimits
from millpond_ratelimit.gate import Gate, TokenBucket
from millpond_ratelimit.limiter import SharedLimiter, describe_rate, limiter_for_url

__all__ = [
    "Gate",
    "InvalidRateLimit",
    "RateLimits",
    "SharedLimiter",
    "TokenBucket",
    "describe_rate",
    "limiter_for_url",
    "parse_rate",
]
