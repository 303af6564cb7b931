"""Connection pools for plain, TLS and sentinel-managed Redis, built from a `RedisConfig`.

redis-py's own retries are switched off: the broker decides what to retry (publish, with a deadline)
and what to surface (a consumer's fetch returns empty and reconnects next time), and an internal
retry of a non-idempotent command such as LPUSH or the fetch script would hide a possible duplicate.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from millpond_broker_redis.config import RedisConfig

#: errors after which a command may simply be sent again (on a fresh connection, or later)
RETRYABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # includes LOADING (a restarted server still reading its AOF)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a failover in progress: the old primary is now a replica
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,  # consumers draining the queues free memory
)
#: server replies redis-py has no class for that also clear up by themselves
_TRANSIENT_CODES = ("MISCONF", "BUSY", "NOREPLICAS")
#: the server refused who we are (WRONGPASS, NOAUTH) or what this user may do (NOPERM): waiting
#: cannot help. redis-py makes the first two a kind of ConnectionError, so every `except` that
#: retries RETRYABLE must catch these first.
ACCESS_ERRORS: tuple[type[BaseException], ...] = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.NoPermissionError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again can help (as opposed to a bug or a wrong password)."""
    if isinstance(exc, ACCESS_ERRORS):
        return False
    if isinstance(exc, RETRYABLE):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_TRANSIENT_CODES)


def access_problem(cfg: RedisConfig, what: str, exc: BaseException) -> str:
    """What to tell the user when Redis refused the credentials or a permission: which, and what
    to check (never the password itself: the URL is masked)."""
    user = cfg.username or "default"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"{what} failed: Redis at {cfg.masked_url} refused it to ACL user {user!r} ({exc}); "
            "millpond runs Lua scripts and list, sorted-set, key and pub/sub commands on its own "
            f"keys: grant them (for example ACL SETUSER {user} ~* &* +@all) and check with "
            "ACL DRYRUN; retrying cannot help"
        )
    if cfg.password is None:
        return (
            f"{what} failed: Redis at {cfg.masked_url} requires a password and the broker URL "
            f"gives none ({exc}); put it in the URL (redis://:PASSWORD@host:port/db, or "
            "redis://USER:PASSWORD@host:port/db for an ACL user)"
        )
    return (
        f"{what} failed: Redis at {cfg.masked_url} refused the credentials of user {user!r} "
        f"({exc}); check the user name and password in the broker URL and that the ACL user "
        "exists and is enabled (ACL LIST); retrying cannot help"
    )


def connection_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "db": cfg.db,
        "username": cfg.username,
        "password": cfg.password,
        "socket_timeout": cfg.socket_timeout,
        "socket_connect_timeout": cfg.socket_connect_timeout,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "client_name": cfg.client_name,
    }
    if cfg.kind == "rediss":
        kwargs.update(
            connection_class=redis.SSLConnection,
            ssl_cert_reqs=cfg.ssl_cert_reqs,
            ssl_ca_certs=cfg.ssl_ca_certs,
            ssl_certfile=cfg.ssl_certfile,
            ssl_keyfile=cfg.ssl_keyfile,
            ssl_check_hostname=cfg.ssl_check_hostname,
        )
    return kwargs


def make_pool(cfg: RedisConfig, sentinel: Sentinel | None = None) -> redis.ConnectionPool:
    """A new pool to the configured server (the current primary, for sentinel URLs)."""
    kwargs = connection_kwargs(cfg)
    if cfg.max_connections is not None:
        kwargs["max_connections"] = cfg.max_connections
    if cfg.kind == "sentinel":
        assert cfg.master_name is not None  # checked by config.parse
        manager = sentinel or make_sentinel(cfg)
        return SentinelConnectionPool(cfg.master_name, manager, **kwargs)  # type: ignore[no-untyped-call]
    return redis.ConnectionPool(host=cfg.host, port=cfg.port, **kwargs)


def make_sentinel(cfg: RedisConfig) -> Sentinel:
    skw: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout,
        "socket_connect_timeout": cfg.socket_connect_timeout,
    }
    if cfg.sentinel_password is not None:
        skw["password"] = cfg.sentinel_password
    skw.update(cfg.sentinel_kwargs)
    return Sentinel(list(cfg.hosts), sentinel_kwargs=skw)  # type: ignore[no-untyped-call]


class Pools:
    """One shared pool per process: rebuilt after `os.fork()` (the parent's sockets are not ours).

    redis-py's pool also checks the pid, but the client objects and the sentinel manager built on
    top of it are rebuilt here too, so a child never shares anything with its parent.
    """

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._pid = -1
        self._pool: redis.ConnectionPool | None = None
        self._client: redis.Redis | None = None
        self._sentinel: Sentinel | None = None

    def client(self) -> redis.Redis:
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._sentinel = make_sentinel(self.cfg) if self.cfg.kind == "sentinel" else None
                self._pool = make_pool(self.cfg, self._sentinel)
                self._client = redis.Redis(connection_pool=self._pool)
            return self._client

    def new_pool(self) -> redis.ConnectionPool:
        """A separate pool (for a consumer's own connections), sharing the sentinel manager."""
        self.client()
        return make_pool(self.cfg, self._sentinel)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.disconnect()
            self._pool = None
            self._client = None
            self._sentinel = None
