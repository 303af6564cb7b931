"""The claims conformance kit: what `millpond beat` relies on from `Broker.claims()`.

    from millpond.testing.claims_kit import ClaimsContract

    class TestRedisClaims(ClaimsContract):
        @pytest.fixture
        def broker_url(self) -> str:
            return "redis://127.0.0.1:6379/0"

The scheduler's "each tick once" rests on these: one holder per key at a time, extension by the
holder only, expiry of a silent holder's claim, release by the holder only, and state that every
instance on the same URL reads back. The class has no `Test` prefix, so pytest collects it only
through a subclass. `cross_process = True` (the default) also checks that a claim taken in another
process is seen here, for brokers several processes share.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from millpond.contracts.broker import Broker, Claims


class ClaimsContract:
    cross_process: ClassVar[bool] = True

    @pytest.fixture
    def broker_url(self) -> str:
        raise NotImplementedError("a ClaimsContract subclass provides the broker_url fixture")

    @pytest.fixture
    def broker(self, broker_url: str) -> Iterator[Broker]:
        from millpond.config import plugins

        made: Broker = plugins.broker_for_url(broker_url)
        yield made
        made.close()

    @pytest.fixture
    def claims(self, broker: Broker) -> Iterator[Claims]:
        made = broker.claims()
        yield made
        made.close()

    @pytest.fixture
    def key(self) -> str:
        return f"kit-claim-{uuid.uuid4().hex[:12]}"

    def test_one_holder_at_a_time(self, claims: Claims, key: str) -> None:
        assert claims.acquire(key, "a", 5.0)
        assert not claims.acquire(key, "b", 5.0)
        holder = claims.holder(key)
        assert holder is not None
        assert holder.owner == "a"
        assert 0 < holder.remaining <= 5.0

    def test_the_holder_extends_its_claim(self, claims: Claims, key: str) -> None:
        # time must pass for a lease to matter: 1.2 s of a 2 s lease, twice (0.8 s of slack
        # for a loaded machine)
        assert claims.acquire(key, "a", 2.0)
        time.sleep(1.2)
        assert claims.acquire(key, "a", 2.0)  # extended to 2 s from now
        time.sleep(1.2)
        assert not claims.acquire(key, "b", 2.0), "the extension did not count"

    def test_a_silent_holder_loses_its_claim(self, claims: Claims, key: str) -> None:
        assert claims.acquire(key, "a", 0.3)
        deadline = time.monotonic() + 5
        while not claims.acquire(key, "b", 5.0):
            assert time.monotonic() < deadline, "the claim never ran out"
            time.sleep(0.05)
        assert claims.holder(key).owner == "b"  # type: ignore[union-attr]

    def test_a_claim_held_elsewhere_is_refused(
        self, broker: Broker, claims: Claims, key: str
    ) -> None:
        other = broker.claims()
        try:
            assert claims.acquire(key, "a", 5.0)
            assert not other.acquire(key, "b", 5.0)
            assert other.holder(key) is not None
            claims.release(key, "a")
            assert other.acquire(key, "b", 5.0)
        finally:
            other.close()

    def test_only_the_holder_releases(self, claims: Claims, key: str) -> None:
        assert claims.acquire(key, "a", 5.0)
        claims.release(key, "b")
        assert claims.holder(key).owner == "a"  # type: ignore[union-attr]
        claims.release(key, "a")
        assert claims.holder(key) is None
        assert claims.acquire(key, "b", 5.0)

    def test_state_is_kept_per_namespace(self, broker: Broker, claims: Claims, key: str) -> None:
        assert claims.load_state(key) == {}
        claims.save_state(key, {"x": "1", "y": "2"})
        claims.save_state(key, {"y": "3"})
        other = broker.claims()
        try:
            assert other.load_state(key) == {"x": "1", "y": "3"}
            assert other.load_state(f"{key}-other") == {}
        finally:
            other.close()

    def test_a_claim_taken_in_another_process_is_seen(
        self, broker_url: str, claims: Claims, key: str
    ) -> None:
        if not self.cross_process:
            pytest.skip("this broker's claims live in one process")
        if not claims.outlives_holder:
            pytest.skip("this broker's claims end with their holder's connection")
        script = (
            "import sys; from millpond.config import plugins; "
            "b = plugins.broker_for_url(sys.argv[1]); "
            "print(b.claims().acquire(sys.argv[2], 'child', 30.0)); b.close()"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, broker_url, key],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "True", out.stderr
        assert not claims.acquire(key, "parent", 5.0)
        holder: Any = claims.holder(key)
        assert holder.owner == "child"

    def test_a_holder_that_dies_frees_its_claims_at_once(
        self, broker_url: str, claims: Claims, key: str
    ) -> None:
        """For brokers whose claims end with their holder's connection (RabbitMQ)."""
        if claims.outlives_holder:
            pytest.skip("this broker's claims outlive their holder's process until they run out")
        script = (
            "import os, sys; from millpond.config import plugins; "
            "b = plugins.broker_for_url(sys.argv[1]); "
            "print(b.claims().acquire(sys.argv[2], 'child', 30.0), flush=True); os._exit(0)"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, broker_url, key],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.strip() == "True", out.stderr
        deadline = time.monotonic() + 5
        while not claims.acquire(key, "parent", 5.0):
            assert time.monotonic() < deadline, "the dead holder's claim was not freed"
            time.sleep(0.05)
