"""Turns a broker URL plus options into one frozen, validated `RedisConfig`.

Everything a user can get wrong is checked here, once, with a message naming the option, the value
and what is allowed, so the hot path never re-validates and a typo fails at start-up instead of
being silently ignored (kombu ignores unknown transport options).

URL query parameters and the options mapping accept the same names; the options mapping wins when
both set one. Passwords live only in fields excluded from `repr`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from millpond.exceptions import ConfigurationError

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
#: kombu's default priority lists: messages with priority 0..2 go to the plain list, 3..5 to
#: `<queue>\x06\x163`, and so on; lower numbers are served first (as in kombu's Redis transport).
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
SSL_CERT_REQS = ("required", "optional", "none")
QUEUE_ORDERS = ("round_robin", "priority")

_MASK = re.compile(r"(//[^:/@;]*):[^@/;]*@")
_SECRET_QUERY = re.compile(r"([?&][^=&#]*(?:password|passwd|secret|token)[^=&#]*=)[^&#;]*", re.I)

#: options people copy from kombu/Celery that mean something else here: a pointed hint beats a
#: generic "unknown option".
_KOMBU_HINTS = {
    "visibility_timeout": "millpond does not redeliver running messages after a fixed time; it "
    "uses per-consumer leases: set lease_timeout (how long a dead consumer's messages stay "
    "reserved) and heartbeat_interval instead (see docs/redis.md)",
    "global_keyprefix": "key prefixes are not supported: they would break sharing queues with "
    "Celery workers that do not use the same prefix; use a separate database (/db in the URL)",
    "unacked_restore_interval": "restoring is automatic; tune lease_timeout instead",
}


def mask(url: str) -> str:
    """The URL with every password replaced by `***` (also in multi-host sentinel URLs, and in
    query parameters such as `sentinel_password=`)."""
    return _SECRET_QUERY.sub(r"\1***", _MASK.sub(r"\1:***@", url))


def _as_float(name: str, value: Any, *, minimum: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise ConfigurationError(f"option {name}={value!r} must be a number of seconds, not a bool")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name}={value!r} is not a number; give seconds, e.g. 2.5")
    if not math.isfinite(out) or out < 0 or (out < minimum and not (allow_zero and out == 0)):
        zero = " (or 0 for none)" if allow_zero else ""
        raise ConfigurationError(f"option {name}={value!r} must be >= {minimum:g}{zero}")
    return out


def _as_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigurationError(f"option {name}={value!r} must be a whole number, not a bool")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name}={value!r} is not a whole number")
    if out < minimum:
        raise ConfigurationError(f"option {name}={value!r} must be >= {minimum}")
    return out


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"option {name}={value!r} must be true or false")


def _as_str(name: str, value: Any) -> str:
    if isinstance(value, bool | int | float | str):
        return str(value)
    raise ConfigurationError(f"option {name}={value!r} must be text")


def _as_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def cast(name: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ConfigurationError(f"option {name}={value!r} must be one of {', '.join(choices)}")
        return text

    return cast


def _as_steps(name: str, value: Any) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        steps = tuple(sorted({int(x) for x in items}))
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"option {name}={value!r} must be a list of whole numbers 0..9, e.g. 0,3,6,9"
        )
    if not steps or steps[0] != 0 or steps[-1] > 9:
        raise ConfigurationError(
            f"option {name}={value!r} must start at 0 and stay within 0..9, e.g. 0,3,6,9"
        )
    return steps


def _as_mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"option {name} must be a mapping (a dict / TOML table)")
    return dict(value)


_CASTS: dict[str, Callable[[str, Any], Any]] = {
    "heartbeat_interval": lambda n, v: _as_float(n, v, minimum=0.01),
    "lease_timeout": lambda n, v: _as_float(n, v, minimum=0.05),
    "publish_retry_timeout": lambda n, v: _as_float(n, v, minimum=0),
    "result_expires": lambda n, v: _as_float(n, v, minimum=1, allow_zero=True),
    "socket_timeout": lambda n, v: _as_float(n, v, minimum=0.01),
    "socket_connect_timeout": lambda n, v: _as_float(n, v, minimum=0.01),
    "idle_timeout": lambda n, v: _as_float(n, v, minimum=0.1),
    "max_connections": lambda n, v: _as_int(n, v, minimum=1),
    "priority_steps": _as_steps,
    "queue_order_strategy": _as_choice(QUEUE_ORDERS),
    "master_name": _as_str,
    "sentinel_password": _as_str,
    "sentinel_kwargs": _as_mapping,
    "ssl_cert_reqs": _as_choice(SSL_CERT_REQS),
    "ssl_ca_certs": _as_str,
    "ssl_certfile": _as_str,
    "ssl_keyfile": _as_str,
    "ssl_check_hostname": _as_bool,
    "client_name": _as_str,
}
KNOWN_OPTIONS = frozenset(_CASTS)


@dataclass(frozen=True, slots=True, repr=False)
class RedisConfig:
    """Where the server is and how the broker behaves; built by `parse`, never by hand."""

    url: str
    kind: str  # "redis" | "rediss" | "sentinel"
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    heartbeat_interval: float = 2.0
    lease_timeout: float = 30.0
    publish_retry_timeout: float = 20.0
    result_expires: float = 86400.0
    socket_timeout: float = 5.0
    socket_connect_timeout: float = 5.0
    #: server-side timeout of one idle blocking wait; bounds how long a dead connection goes unseen
    idle_timeout: float = 10.0
    max_connections: int | None = None
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    queue_order_strategy: str = "round_robin"
    master_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = False
    client_name: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr and f.name != "url"
        )
        return f"RedisConfig(url={self.masked_url!r}, {shown})"

    @property
    def masked_url(self) -> str:
        return mask(self.url)

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]


def _split_host(text: str, default_port: int, url: str) -> tuple[str, int]:
    text = unquote(text)
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host or "localhost", default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(
            f"broker URL {mask(url)!r}: port {port_text!r} is not a number"
        ) from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"broker URL {mask(url)!r}: port {port} is out of range")
    return host or "localhost", port


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts part) of a netloc that may list several hosts."""
    info, sep, hosts = netloc.rpartition("@")
    if not sep:
        return None, None, netloc
    user, colon, password = info.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None), hosts


def _db(path: str, url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    try:
        db = int(text)
    except ValueError:
        raise ConfigurationError(
            f"broker URL {mask(url)!r}: the path must be a database number like /0, got /{text}"
        ) from None
    if db < 0:
        raise ConfigurationError(f"broker URL {mask(url)!r}: database number must be >= 0")
    return db


def _kombu_sentinel(url: str) -> tuple[str, str, str | None, str | None]:
    """kombu's `sentinel://h1:26379;sentinel://h2:26379/0` as (hosts, path, user, password)."""
    hosts: list[str] = []
    user = password = None
    path = query = ""
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        pieces = urlsplit(part)
        if pieces.scheme != "sentinel":
            raise ConfigurationError(
                f"broker URL {mask(url)!r}: every ';'-separated part must start with sentinel://"
            )
        u, p, h = _userinfo(pieces.netloc)
        user, password = u or user, p or password
        hosts.append(h)
        path = pieces.path or path
        query = pieces.query or query
    return ",".join(hosts), path + (f"?{query}" if query else ""), user, password


def parse(url: str, options: Mapping[str, Any] | None = None) -> RedisConfig:
    """Validate the URL and options; a ConfigurationError says what is wrong and what to do."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"broker URL {url!r} is not a URL; use redis://host:6379/0, rediss://... for TLS or "
            "redis+sentinel://host:26379/0?master_name=NAME"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sentinel":
        hosts_part, rest, username, password = _kombu_sentinel(url)
        pieces = urlsplit(f"x://h{rest}")
        kind = "sentinel"
    else:
        pieces = urlsplit(url)
        username, password, hosts_part = _userinfo(pieces.netloc)
        kinds = {"redis": "redis", "rediss": "rediss", "redis+sentinel": "sentinel"}
        if scheme not in kinds:
            raise ConfigurationError(
                f"broker URL {mask(url)!r}: scheme {scheme!r} is not served by "
                "millpond-broker-redis (use redis://, rediss:// or redis+sentinel://)"
            )
        kind = kinds[scheme]

    default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT
    host_items = [h for h in hosts_part.split(",") if h.strip()] or ["localhost"]
    if kind != "sentinel" and len(host_items) > 1:
        raise ConfigurationError(
            f"broker URL {mask(url)!r} names several hosts; only redis+sentinel:// URLs may"
        )
    hosts = tuple(_split_host(h.strip(), default_port, url) for h in host_items)

    raw: dict[str, Any] = {}
    for key, value in parse_qsl(pieces.query, keep_blank_values=True):
        if key not in KNOWN_OPTIONS:
            raise ConfigurationError(_unknown(key, "query parameter"))
        raw[key] = value
    for key, value in (options or {}).items():
        if key not in KNOWN_OPTIONS:
            raise ConfigurationError(_unknown(key, "broker option"))
        if value is not None:
            raw[key] = value

    values: dict[str, Any] = {name: _CASTS[name](name, value) for name, value in raw.items()}
    cfg = RedisConfig(
        url=url,
        kind=kind,
        hosts=hosts,
        db=_db(pieces.path, url),
        username=username,
        password=password,
        **values,
    )
    _check(cfg)
    return cfg


def _unknown(key: str, where: str) -> str:
    if key in _KOMBU_HINTS:
        return f"{where} {key!r} is not supported: {_KOMBU_HINTS[key]}"
    close = difflib.get_close_matches(key, KNOWN_OPTIONS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {where} {key!r}; {hint}known options: {', '.join(sorted(KNOWN_OPTIONS))}"


def _check(cfg: RedisConfig) -> None:
    if cfg.lease_timeout < 2 * cfg.heartbeat_interval:
        raise ConfigurationError(
            f"lease_timeout={cfg.lease_timeout:g} must be at least twice heartbeat_interval="
            f"{cfg.heartbeat_interval:g}, or one late heartbeat would hand a live consumer's "
            "messages to another; raise lease_timeout or lower heartbeat_interval"
        )
    if cfg.kind == "sentinel" and not cfg.master_name:
        raise ConfigurationError(
            f"broker URL {cfg.masked_url!r} is a sentinel URL but names no master; add "
            "?master_name=NAME (the name in the sentinels' `sentinel monitor` line)"
        )
    if cfg.kind != "rediss" and any(
        v is not None for v in (cfg.ssl_ca_certs, cfg.ssl_certfile, cfg.ssl_keyfile)
    ):
        raise ConfigurationError(
            f"TLS options were given but {cfg.masked_url!r} is not a rediss:// URL; "
            "use rediss:// to connect with TLS"
        )
