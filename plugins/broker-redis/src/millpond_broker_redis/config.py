"""Turns a broker URL plus options into one frozen, validated `RedisConfig`.

Everything a user can get wrong is checked here, once, with a message naming the option, the value
and what is allowed, so the hot path never re-validates and a typo fails at start-up instead of
being silently ignored (kombu ignores unknown transport options). The options themselves are cast
by their declarations in `settings.SECTION` (the core's `Section.resolve`, which also reads the
URL's query parameters); what is checked here is only what is particular to Redis: the URL forms,
the priority steps, and the options that depend on each other.

URL query parameters and the options mapping accept the same names; the options mapping wins when
both set one (the core hands the broker its settings with the URL's parameters already weighed in).
Passwords live only in fields excluded from `repr`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from millpond.contracts.broker import mask_url
from millpond.exceptions import ConfigurationError
from millpond_broker_redis.settings import SECTION, RedisSettings

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

#: the URL as errors and logs show it: the core's masking (every member of a sentinel list, an
#: unescaped `@` in a password, secret query parameters), exported under this package's name
mask = mask_url


def _as_steps(value: tuple[str, ...]) -> tuple[int, ...]:
    """The priority steps as sorted whole numbers; they must start at 0 and stay within 0..9."""
    try:
        steps = tuple(sorted({int(x) for x in value}))
    except ValueError:
        raise ConfigurationError(
            f"setting 'redis.priority_steps' has a bad value {value!r}: expected whole numbers "
            "0..9, e.g. 0,3,6,9"
        ) from None
    if not steps or steps[0] != 0 or steps[-1] > 9:
        raise ConfigurationError(
            f"setting 'redis.priority_steps' has a bad value {value!r}: the steps must start at 0 "
            "and stay within 0..9, e.g. 0,3,6,9"
        )
    return steps


@dataclass(frozen=True, slots=True, repr=False, kw_only=True)
class RedisConfig(RedisSettings):
    """One broker instance's validated `[redis]` settings (the fields it inherits, defaults and
    all, from the section's declaration) plus what its URL says: where the server is and as
    whom. Built by `parse`, never by hand."""

    url: str
    kind: str  # "redis" | "rediss" | "sentinel" | "cluster" | "rediss-cluster"
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: `priority_steps` as sorted whole numbers (the setting keeps the text as declared)
    steps: tuple[int, ...]

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr and not f.metadata.get("secret") and f.name != "url"
        )
        return f"RedisConfig(url={self.masked_url!r}, {shown})"

    @property
    def masked_url(self) -> str:
        return mask(self.url)

    @property
    def cluster(self) -> bool:
        """Redis Cluster: every queue's keys carry a hash tag (see `keys.Layout`)."""
        return self.kind in ("cluster", "rediss-cluster")

    @property
    def tls(self) -> bool:
        return self.kind in ("rediss", "rediss-cluster")

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
            f"broker URL {url!r} is not a URL; use redis://host:6379/0, rediss://... for TLS, "
            "redis+sentinel://host:26379/0?master_name=NAME or redis-cluster://h1:7000,h2:7001"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sentinel":
        hosts_part, rest, username, password = _kombu_sentinel(url)
        pieces = urlsplit(f"x://h{rest}")
        kind = "sentinel"
    else:
        pieces = urlsplit(url)
        username, password, hosts_part = _userinfo(pieces.netloc)
        kinds = {
            "redis": "redis",
            "rediss": "rediss",
            "redis+sentinel": "sentinel",
            "redis-cluster": "cluster",
            "rediss-cluster": "rediss-cluster",
        }
        if scheme not in kinds:
            raise ConfigurationError(
                f"broker URL {mask(url)!r}: scheme {scheme!r} is not served by "
                "millpond-broker-redis (use redis://, rediss://, redis+sentinel://, "
                "redis-cluster:// or rediss-cluster://)"
            )
        kind = kinds[scheme]

    default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT
    host_items = [h for h in hosts_part.split(",") if h.strip()] or ["localhost"]
    if kind in ("redis", "rediss") and len(host_items) > 1:
        raise ConfigurationError(
            f"broker URL {mask(url)!r} names several hosts; only redis+sentinel:// and "
            "redis-cluster:// URLs may"
        )
    hosts = tuple(_split_host(h.strip(), default_port, url) for h in host_items)

    values = SECTION.resolve(options, url=url, query=pieces.query)
    steps = _as_steps(values["priority_steps"])
    cfg = RedisConfig(
        url=url,
        kind=kind,
        hosts=hosts,
        db=_db(pieces.path, url),
        username=username,
        password=password,
        steps=steps,
        **values,
    )
    _check(cfg)
    return cfg


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
    if cfg.cluster and cfg.db != 0:
        raise ConfigurationError(
            f"broker URL {cfg.masked_url!r}: Redis Cluster has only database 0, got /{cfg.db}; "
            "drop the path or use /0 (use distinct queue names to keep apps apart)"
        )
    if not cfg.tls and any(
        v is not None for v in (cfg.ssl_ca_certs, cfg.ssl_certfile, cfg.ssl_keyfile)
    ):
        raise ConfigurationError(
            f"TLS options were given but {cfg.masked_url!r} is not a rediss:// or "
            "rediss-cluster:// URL; use one of those to connect with TLS"
        )
