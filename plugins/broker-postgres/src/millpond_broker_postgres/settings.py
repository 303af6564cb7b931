"""The `[postgres]` settings section (`MILLPOND_POSTGRES__LEASE_TIMEOUT=10` in the environment).

The one declaration of every option the Postgres broker and result backend take, whichever way it
is given: the `[postgres]` section of `millpond.toml`, `MILLPOND_POSTGRES__*`,
`Millpond(postgres={...})`, or a URL query parameter (`postgresql://h/db?lease_timeout=10`). The
libpq connection parameters people put in a Postgres URL (`sslmode`, `application_name`, ...) are
declared here too, so the core's settings system validates them like every other option; the
connection is opened with them as keyword arguments. Published under the `millpond.settings`
entry-point group once per URL scheme the plugin serves. It imports nothing from psycopg.
"""

from __future__ import annotations

from dataclasses import dataclass

from millpond.config.options import Section, declared, setting

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

#: options people copy from kombu/Celery that mean something else here
KOMBU_HINTS = {
    "visibility_timeout": "millpond does not redeliver running messages after a fixed time; it "
    "uses per-consumer leases: set lease_timeout (how long a dead consumer's messages stay "
    "reserved) and heartbeat_interval instead (see docs/postgres.md)",
    "polling_interval": "the Postgres broker does not poll: consumers wake on LISTEN/NOTIFY",
}

#: the libpq parameters that are passed to the connection as they are
LIBPQ_OPTIONS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "target_session_attrs",
)


@dataclass(frozen=True)
class PostgresSettings:
    """The [postgres] section: each field declares one setting (`SECTION` is derived from them).

    `config.PostgresConfig` inherits the fields, and is what a broker instance holds."""

    schema: str = setting(
        "millpond",
        "The schema holding millpond's tables (messages, consumers, results); created on first "
        "use when the role may.",
    )
    heartbeat_interval: float = setting(
        2.0,
        "Seconds between a consumer's lease refreshes (done by a helper thread with its own "
        "connection, whatever the worker loop is doing).",
        minimum=0.01,
    )
    lease_timeout: float = setting(
        30.0,
        "Seconds a consumer's messages stay reserved after its last heartbeat; after that any "
        "other consumer gives them back to their queue. A live worker's messages are never "
        "redelivered, however long its tasks run. At least twice heartbeat_interval.",
        minimum=0.05,
    )
    fetch_batch: int = setting(
        100,
        "The most messages one fetch reserves in its one statement (the prefetch window bounds "
        "it further).",
        minimum=1,
        maximum=10000,
    )
    publish_retry_timeout: float = setting(
        20.0,
        "Seconds a publish (or result store) keeps retrying while Postgres is unreachable "
        "before it raises.",
        minimum=0,
    )
    result_expires: float = setting(
        86400.0,
        "Seconds a result stored in Postgres is kept when results are kept by the broker; 0 "
        "keeps them forever. A result_backend URL gets the core's result_expires instead.",
        minimum=0,
    )
    idle_timeout: float = setting(
        10.0,
        "Longest one idle wait for a notification lasts before the consumer checks its "
        "connection and the delayed messages again.",
        minimum=0.1,
    )
    connect_timeout: float = setting(5.0, "Seconds to wait for a connection.", minimum=0.5)
    statement_timeout: float = setting(
        30.0,
        "Server-side limit on one statement of the broker's, in seconds; 0 for none.",
        minimum=0,
    )
    sslmode: str | None = setting(None, "libpq sslmode.", choices=SSL_MODES)
    sslrootcert: str | None = setting(None, "libpq sslrootcert: the CA bundle file.")
    sslcert: str | None = setting(None, "libpq sslcert: the client certificate file.")
    sslkey: str | None = setting(None, "libpq sslkey: the client key file.")
    application_name: str = setting(
        "millpond",
        "libpq application_name (shown in pg_stat_activity).",
    )
    target_session_attrs: str | None = setting(
        None,
        "libpq target_session_attrs (with several hosts in the URL: which one to use).",
        choices=TARGET_SESSION_ATTRS,
    )


SECTION = Section(
    "postgres",
    "PostgreSQL broker and result backend",
    declared(PostgresSettings),
    hints=KOMBU_HINTS,
)
