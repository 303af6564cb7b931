"""A private PostgreSQL for the whole session: initdb into a temporary directory, a free loopback
port, stopped by PID at the end (skipped, saying why, when no PostgreSQL binaries are installed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from millpond.testing.servers import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url
