"""The `[amqp]` settings section (`MILLPOND_AMQP__HEARTBEAT=30` in the environment).

The one declaration of every option the AMQP broker takes, whichever way it is given: the `[amqp]`
section of `millpond.toml`, `MILLPOND_AMQP__*`, `Millpond(amqp={...})`, or a URL query parameter
(`amqp://h//?heartbeat=30`). It is published under the `millpond.settings` entry-point group once
per URL scheme the plugin serves (amqp, amqps, pyamqp), which is how the core finds it for a broker
URL; `millpond_broker_amqp.settings.parse` casts the URL's query through it and builds the
`AmqpConfig` of one broker instance, a subclass that adds what the URL says to these fields (so
each default lives here only). It imports nothing from py-amqp.
"""

from __future__ import annotations

from dataclasses import dataclass

from millpond.config.options import Section, declared, setting


@dataclass(frozen=True)
class AmqpSettings:
    """The [amqp] section: each field declares one setting (`SECTION` is derived from them).

    `settings.AmqpConfig` inherits the fields, and is what a broker instance holds."""

    heartbeat: float = setting(
        4.0,
        "AMQP heartbeat in seconds (0 disables); served by a helper thread even while the "
        "worker loop runs a task inline. A link that stops carrying packets is given up after "
        "two silent heartbeats (about 10 s with 4).",
        minimum=0,
    )
    queue_type: str = setting(
        "classic",
        "Type of the queues millpond declares: classic, or quorum (replicated; must match how "
        "Celery declares shared queues).",
        choices=("classic", "quorum"),
    )
    exchange_type: str = setting(
        "direct",
        "Type of the exchange declared for each queue (Celery's task_default_exchange_type; "
        "must match how Celery declares shared queues): direct, or topic, which Celery's native"
        " delayed delivery on quorum queues needs for a Celery producer's countdowns.",
        choices=("direct", "topic"),
    )
    max_priority: int | None = setting(
        None,
        "x-max-priority of declared classic queues (Celery's task_queue_max_priority); unset "
        "means no priorities.",
        minimum=1,
        maximum=255,
    )
    publish_retry_timeout: float = setting(
        20.0,
        "Seconds a publish keeps reconnecting and retrying while RabbitMQ is unreachable before"
        " it raises PublishError.",
        minimum=0,
    )
    confirm_publish: bool = setting(
        True,
        "Wait for RabbitMQ's publisher confirm before publish() returns (off: fire and forget, "
        "faster, may lose messages).",
    )
    declare_on_publish: bool = setting(
        True,
        "Declare a queue (and its dead-letter queue) the first time this process publishes to "
        "it, like Celery does.",
    )
    connect_timeout: float = setting(
        10.0,
        "Seconds to wait for a TCP/TLS connection and the AMQP handshake.",
        minimum=0,
    )
    operation_timeout: float = setting(
        10.0,
        "Seconds one protocol exchange (a declare, a publisher confirm) may take before the "
        "connection counts as dead.",
        minimum=0,
    )
    reconnect_max_delay: float = setting(
        5.0,
        "Longest pause between a consumer's reconnection attempts (the backoff starts at 0.1 s).",
        minimum=0,
    )
    ssl: bool = setting(False, "Use TLS (amqps:// turns it on).")
    ssl_ca_certs: str | None = setting(None, "CA bundle file to verify the server with.")
    ssl_certfile: str | None = setting(None, "Client certificate file.")
    ssl_keyfile: str | None = setting(None, "Client key file.")
    ssl_cert_reqs: str = setting(
        "required",
        "Verify the server certificate: none, optional or required.",
        choices=("none", "optional", "required"),
    )
    ssl_server_hostname: str | None = setting(
        None,
        "Host name to check the certificate against (and send as SNI), when it differs from the"
        " URL's.",
    )


SECTION = Section(
    "amqp",
    "RabbitMQ (AMQP) broker",
    declared(AmqpSettings),
    hints={
        "transport_options": "kombu's transport_options mean nothing here; give each option "
        "by its own name (see docs/rabbitmq.md)",
    },
)
