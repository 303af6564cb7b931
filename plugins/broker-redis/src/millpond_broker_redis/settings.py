"""The `[redis]` settings section (`MILLPOND_REDIS__LEASE_TIMEOUT=10` in the environment).

Published through the `millpond.settings` entry point so `millpond config` lists these options with
their defaults; the app hands the section to the broker as its options, and `config.parse` checks
them. URL query parameters accept the same names. Imports nothing from redis-py.
"""

from __future__ import annotations

from millpond.settings import Option, Section
from millpond_broker_redis.config import DEFAULT_PRIORITY_STEPS, QUEUE_ORDERS, SSL_CERT_REQS

SECTION = Section(
    "redis",
    "Redis broker",
    (
        Option("heartbeat_interval", "float", 2.0, "Seconds between a consumer's lease "
               "refreshes (done by a helper thread, whatever the worker loop is doing).",
               minimum=0.01),
        Option("lease_timeout", "float", 30.0, "Seconds a consumer's messages stay reserved "
               "after its last heartbeat; after that they return to their queue. A live worker's "
               "messages are never redelivered, however long its tasks run.", minimum=0.05),
        Option("publish_retry_timeout", "float", 20.0, "Seconds a publish (or result store) "
               "keeps retrying while Redis is unreachable before it raises.", minimum=0),
        Option("socket_timeout", "float", 5.0, "Seconds to wait for a Redis reply.",
               minimum=0.01),
        Option("socket_connect_timeout", "float", 5.0, "Seconds to wait for a connection.",
               minimum=0.01),
        Option("idle_timeout", "float", 10.0, "Server-side timeout of one idle blocking wait; "
               "bounds how long a silently dead connection goes unnoticed.", minimum=0.1),
        Option("max_connections", "int", None, "Cap on the producer pool's connections.",
               minimum=1, nullable=True),
        Option("priority_steps", "list", list(DEFAULT_PRIORITY_STEPS), "kombu's priority lists "
               "(lower numbers are served first); must match the Celery side when sharing."),
        Option("queue_order_strategy", "str", "round_robin", "How a worker with several queues "
               "picks: round_robin (fair) or priority (the order of `queues`).",
               choices=QUEUE_ORDERS),
        Option("master_name", "str", None, "Sentinel: the monitored primary's name.",
               nullable=True),
        Option("sentinel_password", "str", None, "Sentinel: the sentinels' own password.",
               nullable=True, secret=True),
        Option("ssl_cert_reqs", "str", "required", "rediss://: verify the server certificate.",
               choices=SSL_CERT_REQS),
        Option("ssl_ca_certs", "str", None, "rediss://: CA bundle file.", nullable=True),
        Option("ssl_certfile", "str", None, "rediss://: client certificate file.",
               nullable=True),
        Option("ssl_keyfile", "str", None, "rediss://: client key file.", nullable=True),
        Option("ssl_check_hostname", "bool", False, "rediss://: check the certificate's host "
               "name."),
        Option("client_name", "str", None, "CLIENT SETNAME for every connection.",
               nullable=True),
    ),
)  # fmt: skip
