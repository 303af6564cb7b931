"""Servers for the kombu broker tests: one moto SQS server per session (a subprocess on a free
loopback port), a temp directory per filesystem test, one Zookeeper per session when installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from millpond_broker_kombu.testing import MotoServer, ZookeeperServer, zookeeper_missing


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    pytest.importorskip("moto", reason="moto is in the dev group: python3 dev.py env")
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def zookeeper() -> Iterator[ZookeeperServer]:
    missing = zookeeper_missing()
    if missing:
        pytest.skip(missing)
    with ZookeeperServer() as server:
        yield server
