"""The brokers under test: their URLs, whether their server is up, queue depth, and clean-up.

Depth and clean-up go through kombu (Redis, RabbitMQ), plain SQL (PostgreSQL) or the core's sqlite
broker rather than the millpond plugin under test, so they still work when that plugin is broken,
which is exactly when a failed run needs to say how many messages were left behind.

PostgreSQL is the server at $BENCH_POSTGRES_URL, or else a private one the harness starts (initdb
in a temporary directory, a free loopback port) and stops by PID when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BROKERS = ("sqlite", "redis", "amqp", "sqs", "filesystem", "postgres")
#: what `--broker` means when not given (sqs, filesystem and postgres are asked for by name: sqs
#: starts a moto server of its own, postgres a private PostgreSQL)
DEFAULT_BROKERS = ("sqlite", "redis", "amqp")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def kombu() -> Any:
    """The kombu module, imported when first needed and typed as Any (kombu ships no types)."""
    import kombu as module

    return module


@dataclass(frozen=True, slots=True)
class Target:
    """A broker as the harness sees it.

    `celery` is False where Celery has no comparable transport (sqlite). `celery_url` and
    `celery_options` (its broker_transport_options) are the same broker as Celery is told of it,
    where that differs from millpond's URL.
    """

    name: str
    url: str
    celery: bool
    celery_url: str = ""
    celery_options: dict[str, Any] = field(default_factory=dict)

    def for_celery(self) -> tuple[str, dict[str, Any]]:
        return self.celery_url or self.url, dict(self.celery_options)

    def options_json(self) -> str:
        return json.dumps(self.celery_options)

    def check(self) -> str | None:
        """None when the server answers, else what is wrong and what to do."""
        if self.name in ("sqlite", "filesystem"):
            return None
        if self.name == "postgres" and not self.url:
            return (
                "no PostgreSQL binaries are installed to start a private server; install "
                "PostgreSQL or set BENCH_POSTGRES_URL, or leave out --broker postgres"
            )
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port
        port = port or {"redis": REDIS_PORT, "postgres": 5432}.get(self.name, 5672)
        try:
            with socket.create_connection((host, port), timeout=2):
                return None
        except OSError as exc:
            return (
                f"{self.name} server at {host}:{port} is not reachable ({exc}); start it or leave "
                f"out --broker {self.name}"
            )


def target(name: str, run_dir: Path, redis_db: int) -> Target:
    """The broker named `name`, with its sqlite file (if any) inside `run_dir`."""
    if name == "sqlite":
        return Target(name, f"sqlite://{run_dir / 'broker.sqlite3'}", celery=False)
    if name == "redis":
        return Target(name, f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}", celery=True)
    if name == "amqp":
        return Target(name, AMQP_URL, celery=True)
    if name == "sqs":
        server = _moto()
        # both frameworks long-poll with kombu's default wait (10 s), over plain HTTP
        return Target(
            name,
            f"{server.url}?is_secure=false",
            celery=True,
            celery_url=server.url,
            celery_options={"region": "us-east-1", "is_secure": False},
        )
    if name == "filesystem":
        folder = run_dir / "queues"
        folder.mkdir(exist_ok=True)
        # Celery's kombu polls every second by default; millpond every 0.1 s: the same for both
        return Target(
            name,
            f"filesystem://{folder}",
            celery=True,
            celery_url="filesystem://",
            celery_options={
                "data_folder_in": str(folder),
                "data_folder_out": str(folder),
                "control_folder": str(run_dir / "control"),
                "polling_interval": 0.1,
            },
        )
    if name == "postgres":  # Celery has no Postgres broker transport to compare with
        return Target(name, os.environ.get("BENCH_POSTGRES_URL") or _private_postgres(), False)
    raise ValueError(f"unknown broker {name!r}; choose from {', '.join(BROKERS)}")


_MOTO: list[Any] = []


def _moto() -> Any:
    """One moto SQS server for the whole run, stopped when the harness exits."""
    if not _MOTO:
        from millpond_broker_kombu.testing import MotoServer

        server = MotoServer().start()
        atexit.register(server.stop)
        _MOTO.append(server)
    return _MOTO[0]


def _plugin_broker(t: Target) -> Any:
    from millpond.config import plugins

    return plugins.broker_for_url(t.url)


def _private_postgres() -> str:
    """Start a private PostgreSQL for this run (stopped at exit); "" when none is installed."""
    from millpond.testing.servers import PostgresServer, find_postgres_bindir

    if find_postgres_bindir() is None:
        return ""
    server = PostgresServer().start()
    atexit.register(server.stop)
    return server.url


def _postgres_sql(url: str, statement: str, queue: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cur = conn.execute(statement, [[queue, f"{queue}.dead"]])
        row = cur.fetchone() if cur.description else None
        return int(row[0]) if row else cur.rowcount


def depth(t: Target, queue: str, framework: str = "") -> int | None:
    """Messages still waiting in `queue` (None when it cannot be told)."""
    try:
        if framework == "dramatiq":
            from benchmarks import dramatiq_tasks

            return dramatiq_tasks.depth(t.url, queue)
        if t.name in ("sqs", "filesystem"):
            broker = _plugin_broker(t)
            try:
                return int(broker.queue_length(queue))
            finally:
                broker.close()
        if t.name == "sqlite":
            from millpond_broker_embedded.sqlite import SqliteBroker

            broker = SqliteBroker(t.url)
            try:
                return broker.queue_length(queue)
            finally:
                broker.close()
        if t.name == "postgres":
            return _postgres_sql(
                t.url, "SELECT count(*) FROM millpond.messages WHERE queue = ANY(%s)", queue
            )
        if t.name == "redis":
            import redis

            client = redis.Redis.from_url(t.url)
            try:
                return int(client.llen(queue))
            finally:
                client.close()
        with kombu().Connection(t.url, connect_timeout=3) as conn:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
                return int(count)
            finally:
                channel.close()
    except Exception:
        return None


def cleanup(t: Target, queue: str, framework: str = "") -> None:
    """Remove the run's queue and whatever the framework declared around it; never raises."""
    try:
        if framework == "dramatiq":
            from benchmarks import dramatiq_tasks

            dramatiq_tasks.cleanup(t.url, queue)
        if t.name == "redis":
            _cleanup_redis(t.url, queue)
        elif t.name == "amqp":
            _cleanup_amqp(t.url, queue)
        elif t.name in ("sqs", "filesystem"):
            broker = _plugin_broker(t)
            try:
                for name in (queue, f"{queue}.dead"):
                    broker.purge(name)
            finally:
                broker.close()
        elif t.name == "postgres":
            _postgres_sql(t.url, "DELETE FROM millpond.messages WHERE queue = ANY(%s)", queue)
        else:
            path = Path(t.url[len("sqlite://") :])
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    except Exception:
        pass


def _cleanup_redis(url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _cleanup_amqp(url: str, queue: str) -> None:
    with kombu().Connection(url, connect_timeout=3) as conn:
        for name in (queue, f"{queue}.dead"):
            channel = conn.channel()
            try:
                channel.queue_delete(queue=name)
            except Exception:
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass
            channel = conn.channel()
            try:
                channel.exchange_delete(exchange=name)
            except Exception:
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
