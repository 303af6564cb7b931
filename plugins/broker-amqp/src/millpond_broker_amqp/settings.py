"""Turn an `amqp://` URL plus an options mapping into one validated, frozen `AmqpConfig`.

Everything is parsed and checked once, when the broker is created, so a typo in an option fails at
start-up with a message naming the option, instead of surfacing as an odd broker error later. The
options are cast by their declarations in `section.SECTION` (the core's `Section.resolve`, which
also reads the URL's query parameters); what is checked here is what is particular to AMQP: the
URL, the TLS context, and options that cannot be combined. Query parameters of the URL and the
options mapping are the same namespace; the mapping wins.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from millpond.contracts.broker import mask_url
from millpond.exceptions import ConfigurationError
from millpond_broker_amqp.section import SECTION, AmqpSettings

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpConfig(AmqpSettings):
    """One broker instance's validated `[amqp]` settings (the fields it inherits, defaults and
    all, from the section's declaration) plus what its URL says: where to connect, as whom, and
    the TLS context. Built by `parse`, never by hand."""

    host: str
    port: int
    userid: str
    password: str = field(repr=False)
    virtual_host: str
    #: the URL with its password masked, for every log line and error message
    safe_url: str
    #: a TLS context, or None for plain TCP
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    #: every node of a failover URL (`amqp://h1//;amqp://h2//`) in order; (host, port) first
    hosts: tuple[tuple[str, int], ...] = ()

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """The nodes to try, in order: the failover list, or the one host."""
        return self.hosts or ((self.host, self.port),)

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"


def _tls_context(values: Mapping[str, Any], enabled: bool) -> ssl.SSLContext | None:
    """The TLS context the options describe, or None for plain TCP."""
    files = {k: values[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")}
    # a CA or a client certificate asks for TLS; a verification mode alone (a default) does not
    if not enabled and not any(files.values()):
        return None
    context = ssl.create_default_context(cafile=files["ssl_ca_certs"])
    certfile, keyfile = files["ssl_certfile"], files["ssl_keyfile"]
    try:
        if certfile:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS client certificate {certfile!r} / key {keyfile!r}: {exc}"
        )
    mode = _CERT_REQS[values["ssl_cert_reqs"]]
    if mode == ssl.CERT_NONE:
        context.check_hostname = False
    context.verify_mode = mode
    return context


def parse(url: str, options: Mapping[str, Any] | None = None) -> AmqpConfig:
    """Validate the URL and options; every problem raises `ConfigurationError` naming it.

    `options["ssl"]` may also be a ready `ssl.SSLContext`, for TLS set up in code.
    """
    safe = mask_url(url)
    members = [m.strip() for m in url.split(";") if m.strip()]
    if len(members) > 1:
        return _parse_failover(url, members, options)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"broker URL {safe!r} is not a valid URL: {exc}")
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps", "pyamqp"):
        raise ConfigurationError(
            f"broker URL {safe!r} has scheme {scheme!r}; the AMQP broker serves amqp://, amqps:// "
            "and pyamqp://"
        )
    given = dict(options or {})
    ready = given.pop("ssl") if isinstance(given.get("ssl"), ssl.SSLContext) else None
    values = SECTION.resolve(given, url=url, masked=safe)
    if values["queue_type"] == "quorum" and values["max_priority"] is not None:
        raise ConfigurationError(
            "options queue_type=quorum and max_priority cannot be combined: RabbitMQ quorum queues "
            "have no message priorities; drop one of them"
        )
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    context = ready or _tls_context(values, scheme == "amqps" or values["ssl"])
    # `ssl` says whether TLS is on, however it was asked for (amqps://, a CA or client
    # certificate, a ready context); `tls` is the context itself
    values["ssl"] = context is not None
    return AmqpConfig(
        host=parts.hostname or "localhost",
        port=port or (DEFAULT_TLS_PORT if context is not None else DEFAULT_PORT),
        userid=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        virtual_host=vhost,
        safe_url=safe,
        tls=context,
        **values,
    )


def _parse_failover(url: str, members: list[str], options: Mapping[str, Any] | None) -> AmqpConfig:
    """kombu's failover form, `amqp://u:p@h1:5672/vh;amqp://u:p@h2:5672/vh`: the nodes of one
    cluster, tried in order whenever a connection is opened (the first that answers serves).
    They must share the scheme, user, password and virtual host (one cluster, one set of
    credentials); options come from every member's query and the options mapping."""
    queries = "&".join(q for q in (urlsplit(m).query for m in members) if q)
    first = parse(urlunsplit(urlsplit(members[0])._replace(query=queries)), options)
    nodes: list[tuple[str, int]] = []
    for member in members:
        safe = mask_url(member)
        try:
            parts = urlsplit(member)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"broker URL {safe!r} is not a valid URL: {exc}")
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "amqps", "pyamqp"):
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r}: every ';'-separated member must be an amqp:// or "
                f"amqps:// URL, not {safe!r}"
            )
        user = unquote(parts.username) if parts.username else "guest"
        password = unquote(parts.password) if parts.password is not None else "guest"
        path = parts.path
        vhost = "/" if path in ("", "/") else unquote(path[1:])
        if (user, password, vhost) != (first.userid, first.password, first.virtual_host):
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r}: the members of a failover list are nodes of one "
                f"cluster and must name the same user, password and virtual host ({safe!r} "
                "differs from the first)"
            )
        default = DEFAULT_TLS_PORT if first.tls is not None else DEFAULT_PORT
        nodes.append((parts.hostname or "localhost", port or default))
    return replace(first, safe_url=mask_url(url), hosts=tuple(nodes))
