"""Fixtures of the fault-injection suite: a `Rig` per broker, closed (workers killed by PID,
queues deleted) whatever the test did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import AMQP_FAST, AMQP_URL, REDIS_FAST, REDIS_URL, Rig

URLS = {"redis": REDIS_URL, "amqp": AMQP_URL}
#: parametrize over both brokers, each case marked with its server's marker
BROKERS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("amqp", marks=pytest.mark.amqp),
]
FAST = {"redis": REDIS_FAST, "amqp": AMQP_FAST, "sqlite": {}}


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(broker: str, url: str | None = None, **env: str) -> Rig:
        directory = tmp_path / f"rig-{len(made)}"
        directory.mkdir()
        if url is None:  # the embedded broker: a file of the rig's own
            url = f"sqlite://{directory / 'broker.db'}" if broker == "sqlite" else URLS[broker]
        rig = Rig(directory, url, {**FAST[broker], **env})
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()
