"""The rate-limits example of docs/rate-limits.md: a geocoding API that allows 5 calls a second
per worker's API key, an SMS gateway that allows 2 a second for the whole account, and unlimited
thumbnail work on the same queue."""

from __future__ import annotations

import time

from millpond import Millpond

app = Millpond("maps")


@app.task(rate_limit="5/s")
def geocode(address: str) -> dict[str, object]:
    """At most 5 starts a second in each worker (Celery's meaning of rate_limit)."""
    return {"address": address, "at": time.time()}


@app.task(rate_limit="2/s", rate_limit_scope="global")
def send_sms(number: str) -> float:
    """At most 2 starts a second across every worker (one bucket in Redis)."""
    return time.time()


@app.task
def thumbnail(name: str) -> float:
    """No limit: never waits behind the limited tasks."""
    return time.time()
