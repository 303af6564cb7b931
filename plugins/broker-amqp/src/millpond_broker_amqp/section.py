"""The `[amqp]` settings section (`MILLPOND_AMQP__HEARTBEAT=30` in the environment).

The one declaration of every option the AMQP broker takes, whichever way it is given: the `[amqp]`
section of `millpond.toml`, `MILLPOND_AMQP__*`, `Millpond(amqp={...})`, or a URL query parameter
(`amqp://h//?heartbeat=30`). It is published under the `millpond.settings` entry-point group once
per URL scheme the plugin serves (amqp, amqps, pyamqp), which is how the core finds it for a broker
URL; `millpond_broker_amqp.settings.parse` casts the URL's query through it. It imports nothing
from py-amqp.
"""

from __future__ import annotations

from millpond.config.options import Option, Section

SECTION = Section(
    "amqp",
    "RabbitMQ (AMQP) broker",
    (
        Option("heartbeat", "float", 4.0, "AMQP heartbeat in seconds (0 disables); served by a "
               "helper thread even while the worker loop runs a task inline. A link that stops "
               "carrying packets is given up after two silent heartbeats (about 10 s with 4).",
               minimum=0),
        Option("queue_type", "str", "classic", "Type of the queues millpond declares: classic, "
               "or quorum (replicated; must match how Celery declares shared queues).",
               choices=("classic", "quorum")),
        Option("exchange_type", "str", "direct", "Type of the exchange declared for each queue "
               "(Celery's task_default_exchange_type; must match how Celery declares shared "
               "queues): direct, or topic, which Celery's native delayed delivery on quorum "
               "queues needs for a Celery producer's countdowns.", choices=("direct", "topic")),
        Option("max_priority", "int", None, "x-max-priority of declared classic queues "
               "(Celery's task_queue_max_priority); unset means no priorities.", minimum=1,
               maximum=255, nullable=True),
        Option("publish_retry_timeout", "float", 20.0, "Seconds a publish keeps reconnecting "
               "and retrying while RabbitMQ is unreachable before it raises PublishError.",
               minimum=0),
        Option("confirm_publish", "bool", True, "Wait for RabbitMQ's publisher confirm before "
               "publish() returns (off: fire and forget, faster, may lose messages)."),
        Option("declare_on_publish", "bool", True, "Declare a queue (and its dead-letter queue) "
               "the first time this process publishes to it, like Celery does."),
        Option("connect_timeout", "float", 10.0, "Seconds to wait for a TCP/TLS connection and "
               "the AMQP handshake.", minimum=0),
        Option("operation_timeout", "float", 10.0, "Seconds one protocol exchange (a declare, a "
               "publisher confirm) may take before the connection counts as dead.", minimum=0),
        Option("reconnect_max_delay", "float", 5.0, "Longest pause between a consumer's "
               "reconnection attempts (the backoff starts at 0.1 s).", minimum=0),
        Option("ssl", "bool", False, "Use TLS (amqps:// turns it on)."),
        Option("ssl_ca_certs", "str", None, "CA bundle file to verify the server with.",
               nullable=True),
        Option("ssl_certfile", "str", None, "Client certificate file.", nullable=True),
        Option("ssl_keyfile", "str", None, "Client key file.", nullable=True),
        Option("ssl_cert_reqs", "str", "required", "Verify the server certificate: none, "
               "optional or required.", choices=("none", "optional", "required")),
        Option("ssl_server_hostname", "str", None, "Host name to check the certificate "
               "against (and send as SNI), when it differs from the URL's.", nullable=True),
    ),
    hints={
        "transport_options": "kombu's transport_options mean nothing here; give each option "
        "by its own name (see docs/rabbitmq.md)",
    },
)  # fmt: skip
