"""Turns a broker URL plus options into one frozen, validated `PostgresConfig`.

Everything a user can get wrong is checked here, once, with a message naming the option, the value
and what is allowed: the options are cast by their declarations in `settings.SECTION` (which also
reads the URL's query parameters); what is checked here is what is particular to Postgres: the URL
form, the schema name, and the options that depend on each other. The URL handed to libpq has its
query removed: the libpq parameters among the options travel as keyword arguments instead, so a
millpond option in the query never reaches libpq (which would refuse it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from millpond.contracts.broker import mask_url
from millpond.exceptions import ConfigurationError
from millpond_broker_postgres.settings import LIBPQ_OPTIONS, SECTION, PostgresSettings

SCHEMES = ("postgresql", "postgres")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True, repr=False, kw_only=True)
class PostgresConfig(PostgresSettings):
    """One broker instance's validated `[postgres]` settings (the fields it inherits, defaults
    and all, from the section's declaration) plus its URL; built by `parse`, never by hand."""

    url: str
    #: the URL without its query, as libpq takes it (the password stays in it: never logged)
    conninfo: str = field(repr=False)

    @property
    def libpq(self) -> dict[str, Any]:
        """The libpq keyword parameters among the settings (sslmode, application_name, ...)."""
        return {name: getattr(self, name) for name in LIBPQ_OPTIONS}

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def __repr__(self) -> str:
        return (
            f"PostgresConfig(url={self.masked_url!r}, schema={self.schema!r}, "
            f"lease_timeout={self.lease_timeout:g}, heartbeat_interval={self.heartbeat_interval:g})"
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `psycopg.connect` besides the conninfo."""
        kwargs: dict[str, Any] = {k: v for k, v in self.libpq.items() if v is not None}
        kwargs["connect_timeout"] = max(1, round(self.connect_timeout))
        if self.statement_timeout:
            kwargs["options"] = f"-c statement_timeout={int(self.statement_timeout * 1000)}"
        return kwargs


def parse(url: str, options: Mapping[str, Any] | None = None) -> PostgresConfig:
    """Validate the URL and options; a ConfigurationError says what is wrong and what to do."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"broker URL {url!r} is not a URL; use postgresql://user:password@host:5432/dbname"
        )
    masked = mask_url(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigurationError(
            f"URL {masked!r}: scheme {parts.scheme!r} is not served by millpond-broker-postgres "
            "(use postgresql:// or postgres://)"
        )
    values = SECTION.resolve(options, url=url, masked=masked)
    schema = values["schema"]
    if not _IDENTIFIER.match(schema):
        raise ConfigurationError(
            f"setting 'postgres.schema' has a bad value {schema!r}: expected a lower-case "
            "identifier (letters, digits, _; at most 63 characters), e.g. millpond"
        )
    conninfo = urlunsplit(parts._replace(query="", fragment=""))
    cfg = PostgresConfig(url=url, conninfo=conninfo, **values)
    if cfg.lease_timeout < 2 * cfg.heartbeat_interval:
        raise ConfigurationError(
            f"lease_timeout={cfg.lease_timeout:g} must be at least twice heartbeat_interval="
            f"{cfg.heartbeat_interval:g}, or one late heartbeat would hand a live consumer's "
            "messages to another; raise lease_timeout or lower heartbeat_interval"
        )
    return cfg
