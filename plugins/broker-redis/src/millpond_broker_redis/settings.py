"""The `[redis]` settings section (`MILLPOND_REDIS__LEASE_TIMEOUT=10` in the environment).

The one declaration of every option the Redis broker and result backend take, whichever way it is
given: the `[redis]` section of `millpond.toml`, `MILLPOND_REDIS__*`, `Millpond(redis={...})`, or a
URL query parameter (`redis://h/0?lease_timeout=10`). It is published under the `millpond.settings`
entry-point group once per URL scheme the plugin serves (redis, rediss, redis+sentinel,
redis-cluster, rediss-cluster), which is how the core finds it for a broker URL; `config.parse`
casts the URL's query through it (the `ssl_*` options apply to rediss-cluster:// as to rediss://).
It imports nothing from redis-py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from millpond.config.options import Section, declared, setting

#: kombu's default priority lists: messages with priority 0..2 go to the plain list, 3..5 to
#: `<queue>\x06\x163`, and so on; lower numbers are served first (as in kombu's Redis transport).
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
SSL_CERT_REQS = ("required", "optional", "none")
QUEUE_ORDERS = ("round_robin", "priority")
DELAY_MODES = ("auto", "broker", "celery")

#: options people copy from kombu/Celery that mean something else here: a pointed hint beats a
#: generic "unknown setting".
KOMBU_HINTS = {
    "visibility_timeout": "millpond does not redeliver running messages after a fixed time; it "
    "uses per-consumer leases: set lease_timeout (how long a dead consumer's messages stay "
    "reserved) and heartbeat_interval instead (see docs/redis.md)",
    "global_keyprefix": "key prefixes are not supported: they would break sharing queues with "
    "Celery workers that do not use the same prefix; use a separate database (/db in the URL)",
    "unacked_restore_interval": "restoring is automatic; tune lease_timeout instead",
    "sep": "millpond reads and writes kombu's default priority separator \\x06\\x16 only; a "
    "Celery side with another sep writes priority lists millpond never reads: remove sep from "
    "Celery's broker_transport_options before sharing queues",
    "fanout_prefix": "broadcasts (remote control, events) use millpond's own pub/sub channels, "
    "not kombu's fanout exchanges; remove fanout_prefix (see docs/redis.md)",
    "fanout_patterns": "broadcasts (remote control, events) use millpond's own pub/sub channels, "
    "not kombu's fanout exchanges; remove fanout_patterns (see docs/redis.md)",
}


@dataclass(frozen=True)
class RedisSettings:
    """The [redis] section: each field declares one setting (`SECTION` is derived from them).

    `config.RedisConfig` inherits the fields, and is what a broker instance holds."""

    heartbeat_interval: float = setting(
        2.0,
        "Seconds between a consumer's lease refreshes (done by a helper thread, whatever the "
        "worker loop is doing).",
        minimum=0.01,
    )
    lease_timeout: float = setting(
        30.0,
        "Seconds a consumer's messages stay reserved after its last heartbeat; after that they "
        "return to their queue. A live worker's messages are never redelivered, however long "
        "its tasks run. At least twice heartbeat_interval.",
        minimum=0.05,
    )
    publish_retry_timeout: float = setting(
        20.0,
        "Seconds a publish (or result store) keeps retrying while Redis is unreachable before "
        "it raises.",
        minimum=0,
    )
    result_expires: float = setting(
        86400.0,
        "Seconds a result stored in Redis is kept when results are kept by the broker; 0 keeps "
        "them forever. A result_backend URL gets the core's result_expires instead.",
        minimum=0,
    )
    socket_timeout: float = setting(5.0, "Seconds to wait for a Redis reply.", minimum=0.01)
    socket_connect_timeout: float = setting(5.0, "Seconds to wait for a connection.", minimum=0.01)
    idle_timeout: float = setting(
        10.0,
        "Server-side timeout of one idle blocking wait; bounds how long a silently dead "
        "connection goes unnoticed.",
        minimum=0.1,
    )
    max_connections: int | None = setting(
        None,
        "Cap on the producer pool's connections.",
        minimum=1,
    )
    priority_steps: tuple[str, ...] = setting(
        tuple(str(s) for s in DEFAULT_PRIORITY_STEPS),
        "kombu's priority lists (lower numbers are served first): whole numbers starting at 0, "
        "within 0..9; must match the Celery side when sharing.",
    )
    queue_order_strategy: str = setting(
        "round_robin",
        "How a worker with several queues picks: round_robin (fair) or priority (the order of "
        "`queues`).",
        choices=QUEUE_ORDERS,
    )
    delays: str = setting(
        "auto",
        "Where a countdown or eta waits: broker (in Redis, released by millpond workers), "
        "celery (sent at once with the eta in its headers, as Celery sends it, for queues "
        "Celery workers serve), or auto (broker while a millpond worker serves the queue, else "
        "celery, so no delay is ever stranded).",
        choices=DELAY_MODES,
    )
    master_name: str | None = setting(None, "Sentinel: the monitored primary's name.")
    sentinel_password: str | None = setting(
        None,
        "Sentinel: the sentinels' own password.",
        secret=True,
    )
    sentinel_kwargs: Mapping[str, Any] = setting(
        {},
        "Sentinel: other keyword arguments for the connections to the sentinels (redis-py's "
        "sentinel_kwargs).",
        secret=True,
    )
    ssl_cert_reqs: str = setting(
        "required",
        "rediss://: verify the server certificate.",
        choices=SSL_CERT_REQS,
    )
    ssl_ca_certs: str | None = setting(None, "rediss://: CA bundle file.")
    ssl_certfile: str | None = setting(None, "rediss://: client certificate file.")
    ssl_keyfile: str | None = setting(None, "rediss://: client key file.")
    ssl_check_hostname: bool = setting(False, "rediss://: check the certificate's host name.")
    client_name: str | None = setting(None, "CLIENT SETNAME for every connection.")
    warn_without_persistence: bool = setting(
        True,
        "Warn once when a worker starts on a Redis that keeps neither an append-only file nor "
        "snapshots (a restart would lose every queued and delayed task); false silences it "
        "where that is intended.",
    )


SECTION = Section("redis", "Redis broker", declared(RedisSettings), hints=KOMBU_HINTS)
