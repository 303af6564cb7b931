"""Turn an `amqp://` URL plus an options mapping into one validated, frozen settings object.

Everything is parsed and checked once, when the broker is created, so a typo in an option fails at
start-up with a message naming the option, instead of surfacing as an odd broker error later. Query
parameters of the URL and the options mapping are the same namespace; the mapping wins.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from millpond.broker import mask_url
from millpond.exceptions import ConfigurationError

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
QUEUE_TYPES = ("classic", "quorum")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    """Connection parameters and behaviour switches of one broker instance."""

    host: str
    port: int
    userid: str
    password: str = field(repr=False)
    virtual_host: str
    #: the URL with its password masked, for every log line and error message
    safe_url: str
    #: a TLS context, or None for plain TCP
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    tls_server_hostname: str | None = None
    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    #: bound on one blocking protocol exchange (a declare, a confirm) before the link counts as dead
    operation_timeout: float = 10.0
    publish_retry_timeout: float = 20.0
    confirm_publish: bool = True
    queue_type: str = "classic"
    max_priority: int | None = None
    declare_on_publish: bool = True
    reconnect_max_delay: float = 5.0

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"option {name!r} must be true or false, got {value!r}")


def _as_float(name: str, value: Any, *, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name!r} must be a number of seconds, got {value!r}")
    if not math.isfinite(number) or number < minimum:
        raise ConfigurationError(
            f"option {name!r} must be a finite number >= {minimum}, got {value!r}"
        )
    return number


def _as_priority(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name!r} must be an integer from 1 to 255, got {value!r}")
    if not 1 <= number <= 255:
        raise ConfigurationError(f"option {name!r} must be an integer from 1 to 255, got {value!r}")
    return number


def _as_queue_type(name: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text not in QUEUE_TYPES:
        raise ConfigurationError(
            f"option {name!r} must be one of {', '.join(QUEUE_TYPES)}, got {value!r}"
        )
    return text


_SCALARS: dict[str, Callable[[str, Any], Any]] = {
    "heartbeat": _as_float,
    "connect_timeout": _as_float,
    "operation_timeout": _as_float,
    "publish_retry_timeout": _as_float,
    "reconnect_max_delay": _as_float,
    "confirm_publish": _as_bool,
    "declare_on_publish": _as_bool,
    "queue_type": _as_queue_type,
    "max_priority": _as_priority,
}
_TLS_KEYS = frozenset(
    {"ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_server_hostname"}
)
#: options other plugins or Celery users pass that mean nothing here; accepted without a warning
_IGNORED = frozenset({"transport_options"})


def _tls_context(opts: Mapping[str, Any], enabled: bool) -> ssl.SSLContext | None:
    """The TLS context the options describe; `ssl` may also be a ready `ssl.SSLContext`."""
    given = opts.get("ssl")
    if isinstance(given, ssl.SSLContext):
        return given
    if given is not None and not isinstance(given, dict):
        enabled = enabled or _as_bool("ssl", given)
    extra: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
        if opts.get(key) is not None:
            extra[key.removeprefix("ssl_")] = opts[key]
    # a CA or a client certificate asks for TLS; a verification mode alone (a default) does not
    if not enabled and not ({"ca_certs", "certfile", "keyfile"} & set(extra)):
        return None
    context = ssl.create_default_context(cafile=extra.get("ca_certs"))
    certfile, keyfile = extra.get("certfile"), extra.get("keyfile")
    try:
        if certfile:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS client certificate {certfile!r} / key {keyfile!r}: {exc}"
        )
    reqs = extra.get("cert_reqs")
    if reqs is not None:
        key = str(reqs).strip().lower().removeprefix("cert_")
        if key not in _CERT_REQS:
            raise ConfigurationError(
                f"option 'ssl_cert_reqs' must be one of none, optional, required; got {reqs!r}"
            )
        if _CERT_REQS[key] == ssl.CERT_NONE:
            context.check_hostname = False
        context.verify_mode = _CERT_REQS[key]
    return context


def parse(url: str, options: Mapping[str, Any] | None = None) -> AmqpSettings:
    """Validate the URL and options; every problem raises `ConfigurationError` naming it."""
    safe = mask_url(url)
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
    tls = scheme == "amqps"
    opts: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    opts.update(options or {})

    unknown = sorted(set(opts) - set(_SCALARS) - _TLS_KEYS - _IGNORED)
    if unknown:
        known = ", ".join(sorted(set(_SCALARS) | _TLS_KEYS))
        raise ConfigurationError(
            f"unknown AMQP broker option(s) {', '.join(unknown)} in {safe!r} or the broker "
            f"options; known options: {known}"
        )
    values = {name: check(name, opts[name]) for name, check in _SCALARS.items() if name in opts}
    if values.get("queue_type") == "quorum" and values.get("max_priority") is not None:
        raise ConfigurationError(
            "options queue_type=quorum and max_priority cannot be combined: RabbitMQ quorum queues "
            "have no message priorities; drop one of them"
        )
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    context = _tls_context(opts, tls)
    server_hostname = opts.get("ssl_server_hostname") or None
    return AmqpSettings(
        host=parts.hostname or "localhost",
        port=port or (DEFAULT_TLS_PORT if context is not None else DEFAULT_PORT),
        userid=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        virtual_host=vhost,
        safe_url=safe,
        tls=context,
        tls_server_hostname=str(server_hostname) if server_hostname else None,
        **values,
    )
