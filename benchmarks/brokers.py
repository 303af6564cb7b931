"""The brokers under test: their URLs, whether their server is up, queue depth, and clean-up.

Depth and clean-up go through kombu (Redis, RabbitMQ) or the core's sqlite broker rather than the
millpond plugin under test, so they still work when that plugin is broken, which is exactly when a
failed run needs to say how many messages were left behind.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BROKERS = ("sqlite", "redis", "amqp")
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

    `celery` is False where Celery has no comparable transport (sqlite).
    """

    name: str
    url: str
    celery: bool

    def check(self) -> str | None:
        """None when the server answers, else what is wrong and what to do."""
        if self.name == "sqlite":
            return None
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port
        port = port or (REDIS_PORT if self.name == "redis" else 5672)
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
    raise ValueError(f"unknown broker {name!r}; choose from {', '.join(BROKERS)}")


def depth(t: Target, queue: str) -> int | None:
    """Messages still waiting in `queue` (None when it cannot be told)."""
    try:
        if t.name == "sqlite":
            from millpond.brokers.sqlite import SqliteBroker

            broker = SqliteBroker(t.url)
            try:
                return broker.queue_length(queue)
            finally:
                broker.close()
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


def cleanup(t: Target, queue: str) -> None:
    """Remove the run's queue and whatever either framework declared around it; never raises."""
    try:
        if t.name == "redis":
            _cleanup_redis(t.url, queue)
        elif t.name == "amqp":
            _cleanup_amqp(t.url, queue)
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
