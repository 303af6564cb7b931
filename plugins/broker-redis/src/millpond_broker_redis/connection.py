"""Connection pools for plain, TLS, sentinel-managed and clustered Redis, from a `RedisConfig`.

On Redis Cluster the client is redis-py's `RedisCluster`: it follows MOVED and ASK redirections
itself and re-reads the slot map after one (or after a node stopped answering), so a resharding or
a primary's failover is ridden through. It offers the same commands as `redis.Redis` for what this
plugin sends (single-slot commands, scripts whose keys share a slot, pipelines), so the rest of the
plugin takes either as a `redis.Redis`.

redis-py's own retries are switched off: the broker decides what to retry (publish, with a deadline)
and what to surface (a consumer's fetch returns empty and reconnects next time), and an internal
retry of a non-idempotent command such as LPUSH or the fetch script would hide a possible duplicate.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, cast

import redis
from redis._parsers.encoders import Encoder
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from millpond_broker_redis.config import RedisConfig

#: errors after which a command may simply be sent again (on a fresh connection, or later)
RETRYABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # includes LOADING (a restarted server still reading its AOF)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a failover in progress: the old primary is now a replica
    redis.exceptions.MasterDownError,
    redis.exceptions.ClusterDownError,  # a cluster electing a new primary for some slots
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
        kwargs.update(connection_class=redis.SSLConnection)
    if cfg.tls:
        kwargs.update(
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


class ScriptEncoder:
    """What a `redis.commands.core.Script` needs of its registered client: the encoder, to hash
    the script's text. Every call of the plugin's scripts passes the client to run on, so no
    script holds a client (or connects when it is made: a cluster client would at once)."""

    @staticmethod
    def get_encoder() -> Encoder:
        return Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]


SCRIPT_ENCODER: Any = ScriptEncoder()


def _as_redis_error(exc: RedisClusterException) -> redis.RedisError:
    """redis-py's cluster errors outside `RedisError`, as the `RedisError` the plugin handles: a
    slot no node serves, or no node answering, is a connection problem (retried, like a server
    that is away); anything else (a bug, such as keys of several slots) is an error that says so."""
    if isinstance(exc, SlotNotCoveredError) or "cannot be connected" in str(exc):
        return redis.ConnectionError(f"Redis Cluster: {exc}")
    return redis.RedisError(f"Redis Cluster refused it: {exc}")


class _Cluster(RedisCluster):
    """`RedisCluster` whose every error is a `RedisError` (see `_as_redis_error`)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisClusterException as exc:
            raise _as_redis_error(exc) from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        execute = pipe.execute

        def guarded(raise_on_error: bool = True) -> Any:
            try:
                return execute(raise_on_error)
            except RedisClusterException as exc:
                raise _as_redis_error(exc) from exc

        pipe.execute = guarded
        return pipe


def cluster_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    """What `RedisCluster` is given besides the nodes: every node connection's settings (TLS with
    `ssl=True` and the `ssl_*` options on rediss-cluster://), no database (a cluster has only 0)."""
    kwargs = connection_kwargs(cfg)
    del kwargs["db"]
    if cfg.tls:
        kwargs["ssl"] = True
    if cfg.max_connections is not None:
        kwargs["max_connections"] = cfg.max_connections
    return kwargs


def make_cluster(cfg: RedisConfig) -> RedisCluster:
    """A cluster client starting from the URL's nodes (any one that answers gives the slot map).

    Its retries are off like the plain client's (`retry` with no attempts): a connection error
    reaches the broker, which decides what to retry; a redirection (MOVED, ASK) is followed
    whatever the retry setting, which is what a resharding or a failover needs."""
    nodes = [ClusterNode(host, port) for host, port in cfg.hosts]  # type: ignore[no-untyped-call]
    try:
        return _Cluster(startup_nodes=nodes, require_full_coverage=True, **cluster_kwargs(cfg))
    except ACCESS_ERRORS:
        raise
    except (RedisClusterException, redis.RedisError) as exc:
        # no node answered (yet): a connection problem the callers retry, like a plain server's
        raise redis.ConnectionError(
            f"no node of the Redis Cluster at {cfg.masked_url} gave the slot map: {exc}"
        ) from exc


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
                if self.cfg.cluster:
                    self._pool = None
                    self._client = cast(redis.Redis, make_cluster(self.cfg))
                else:
                    sentinel = make_sentinel(self.cfg) if self.cfg.kind == "sentinel" else None
                    self._sentinel = sentinel
                    self._pool = make_pool(self.cfg, self._sentinel)
                    self._client = redis.Redis(connection_pool=self._pool)
            return self._client

    def own_client(self) -> tuple[redis.Redis, Callable[[str], redis.ConnectionPool]]:
        """A client with connections of its own (for a consumer), and where to open a dedicated
        connection for a key: the pool of the node that serves the key (the one pool when there
        is no cluster), looked up when asked, so after a failover it is the new primary's."""
        if self.cfg.cluster:
            cluster = make_cluster(self.cfg)

            def node_pool(key: str) -> redis.ConnectionPool:
                node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
                if node is None or node.redis_connection is None:
                    cluster.nodes_manager.initialize()
                    node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
                if node is None or node.redis_connection is None:
                    raise redis.ConnectionError(f"no cluster node serves the slot of {key!r}")
                pool: redis.ConnectionPool = node.redis_connection.connection_pool
                return pool

            return cast(redis.Redis, cluster), node_pool
        pool = self.new_pool()
        # from_pool: closing the client disconnects the pool, which is this client's alone
        return redis.Redis.from_pool(pool), lambda _key: pool

    def new_pool(self) -> redis.ConnectionPool:
        """A separate pool (for a consumer's own connections), sharing the sentinel manager."""
        if self.cfg.cluster:
            raise RuntimeError("a Redis Cluster has a pool per node: use own_client()")
        self.client()
        return make_pool(self.cfg, self._sentinel)

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                if self._pool is not None:
                    self._pool.disconnect()
                elif self._client is not None:
                    self._client.close()
            self._pool = None
            self._client = None
            self._sentinel = None
