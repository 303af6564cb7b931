"""The Redis broker on a real Redis Cluster of three primaries (`redis-cluster://`).

The cluster is private: three `redis-server --cluster-enabled yes` on free loopback ports, joined
by `redis-cli --cluster create` and stopped by their processes when the module is done. The
conformance kit runs on it unchanged; the tests below check what is particular to a cluster: each
queue's keys share one slot, queues land on different primaries, and what cannot work there is
refused with a message saying so.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from millpond.exceptions import ConfigurationError
from millpond.testing.broker_kit import BrokerContract
from millpond.testing.servers import RedisClusterGroup, make_certs
from millpond.wire.protocol import Message
from millpond_broker_redis import RedisBroker, keys, parse

LEASE = {"lease_timeout": 1.0, "heartbeat_interval": 0.2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield group
    finally:
        group.stop()


def client_of(group: RedisClusterGroup) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in group.ports[:3]])


class TestRedisClusterContract(BrokerContract):
    redelivery_slack = 3.0

    @pytest.fixture
    def broker_url(self, cluster: RedisClusterGroup) -> str:
        return cluster.url()

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {**LEASE, "delays": "broker", "warn_without_persistence": False}


# -- configuration -------------------------------------------------------------------------------


def test_cluster_urls_parse_with_every_node_and_tls() -> None:
    cfg = parse("redis-cluster://:pw@h1:7000,h2:7001,[::1]:7002")
    assert cfg.cluster and not cfg.tls
    assert cfg.hosts == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    assert cfg.password == "pw"
    assert "pw" not in repr(cfg)
    tls = parse("rediss-cluster://h1:7000?ssl_cert_reqs=none")
    assert tls.cluster and tls.tls and tls.ssl_cert_reqs == "none"


def test_a_tls_cluster_url_gives_every_node_connection_tls() -> None:
    from millpond_broker_redis.connection import cluster_kwargs

    kwargs = cluster_kwargs(
        parse("rediss-cluster://:pw@h1:7000,h2:7001?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional")
    )
    assert kwargs["ssl"] is True
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_cert_reqs"] == "optional"
    assert kwargs["password"] == "pw" and "db" not in kwargs
    assert kwargs["retry"].get_retries() == 0  # the broker decides what to retry
    assert "ssl" not in cluster_kwargs(parse("redis-cluster://h1:7000"))


def test_a_cluster_url_with_a_database_number_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="only database 0"):
        parse("redis-cluster://h1:7000/3")


def test_tls_options_on_a_plain_cluster_url_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="rediss-cluster://"):
        parse("redis-cluster://h1:7000?ssl_ca_certs=/ca.pem")


def test_a_queue_name_with_braces_is_refused_on_a_cluster_only() -> None:
    layout = keys.Layout(cluster=True)
    with pytest.raises(ConfigurationError, match="hash tag"):
        layout.check("a{b}")
    assert keys.Layout().check("a{b}") == "a{b}"


def test_every_key_of_a_queue_shares_its_slot(cluster: RedisClusterGroup) -> None:
    layout = keys.Layout(cluster=True)
    queue = f"orders-{uuid.uuid4().hex[:6]}"
    kq = layout.queue(queue)
    names = [
        *keys.list_keys(kq, (0, 3, 6, 9)),
        keys.delayed_key(kq),
        keys.counts_key(kq),
        keys.serving_key(kq),
        keys.dead_key(kq),
        layout.queue(keys.dead_key(queue)),
        layout.consumers(queue),
        layout.restore_gate(queue),
        keys.unacked_key(layout.member(queue, "c1")),
        keys.lease_key(layout.member(queue, "c1")),
    ]
    assert {cluster.keyslot(n) for n in names} == {cluster.keyslot(queue)}
    chord = [layout.group("g-1", s) for s in ("", ".j", ".t", ".s", ".d", ".c")]
    assert len({cluster.keyslot(n) for n in chord}) == 1


# -- placement and operation ---------------------------------------------------------------------


def test_three_queues_land_on_three_primaries_and_serve_from_one_consumer(
    cluster: RedisClusterGroup,
) -> None:
    queues = cluster.names_on_distinct_primaries("cq")
    broker = RedisBroker(cluster.url(), {**LEASE, "warn_without_persistence": False})
    client = client_of(cluster)
    try:
        for q in queues:
            for n in range(5):
                broker.publish(q, Message(b"[[], {}, {}]", {"id": f"{q}-{n}", "task": "t"}))
        owners = set()
        for q in queues:
            key = broker.layout.queue(q)
            assert client.llen(key) == 5
            owners.add(cluster.slot_owner(cluster.keyslot(key)))
        assert len(owners) == 3
        consumer = broker.consumer(queues, prefetch=0)
        try:
            got: list[Any] = []
            for _ in range(50):
                got += consumer.fetch(100, 0.5)
                if len(got) >= 15:
                    break
            assert sorted(d.message.headers["id"] for d in got) == sorted(
                f"{q}-{n}" for q in queues for n in range(5)
            )
            assert {d.queue for d in got} == set(queues)
            consumer.ack(got)
            assert all(broker.queue_stats(q).reserved == 0 for q in queues)
        finally:
            consumer.close()
    finally:
        for q in queues:
            broker.purge(q)
        client.close()
        broker.close()


def test_a_blocked_consumer_wakes_for_a_push_on_another_primary(
    cluster: RedisClusterGroup,
) -> None:
    import threading

    queues = cluster.names_on_distinct_primaries("cq")
    broker = RedisBroker(cluster.url(), {**LEASE, "warn_without_persistence": False})
    consumer = broker.consumer(queues, prefetch=0)
    try:
        assert consumer.fetch(10, 0.2) == []  # arms the doorbells on all three primaries
        timer = threading.Timer(
            0.3, lambda: broker.publish(queues[2], Message(b"[[], {}, {}]", {"id": "late"}))
        )
        timer.start()
        got = consumer.fetch(10, 20.0)
        timer.join()
        assert [d.message.headers["id"] for d in got] == ["late"]
        consumer.ack(got)
    finally:
        consumer.close()
        broker.close()


def test_the_cluster_client_is_what_the_broker_uses(cluster: RedisClusterGroup) -> None:
    broker = RedisBroker(cluster.url(), dict(LEASE))
    try:
        assert isinstance(broker.pools.client(), redis.RedisCluster)
        broker.connect()
    finally:
        broker.close()


def test_a_cluster_that_cannot_be_reached_is_a_clear_error() -> None:
    from millpond.exceptions import BrokerError
    from millpond.testing.servers import free_port

    url = f"redis-cluster://127.0.0.1:{free_port()}"
    broker = RedisBroker(url, {**LEASE, "publish_retry_timeout": 0.5})  # builds without a server
    try:
        with pytest.raises(BrokerError, match=r"did not answer.*no node of the Redis Cluster"):
            broker.connect()
    finally:
        broker.close()


# -- results, chords, rate limits and claims on a cluster ----------------------------------------


def test_a_chord_joins_on_one_slot_of_the_cluster(cluster: RedisClusterGroup) -> None:
    from millpond_broker_redis import RedisResultBackend

    backend = RedisResultBackend(cluster.url(), {})
    client = client_of(cluster)
    group_id = f"g-{uuid.uuid4().hex}"
    try:
        backend.set_chord_size(group_id, 2)
        assert backend.chord_part_return(group_id, "t1", 1, "SUCCESS", 1) is None
        parts = backend.chord_part_return(group_id, "t0", 0, "SUCCESS", 0)
        assert parts == [("t0", "SUCCESS", 0), ("t1", "SUCCESS", 1)]
        tagged = f"celery-taskset-meta-{{{group_id}}}"
        assert client.zcard(tagged + ".j") == 2  # the hash-tagged names, one slot
        backend.chord_done(group_id)
        assert client.get(tagged + ".c") == b"done"
        backend.save_group(group_id, ["a", "b"])
        assert backend.restore_group(group_id) is not None
    finally:
        client.close()
        backend.close()


def test_a_global_rate_limit_and_a_claim_work_on_the_cluster(cluster: RedisClusterGroup) -> None:
    from millpond_broker_redis.limiter import RedisRateLimiter

    limiter = RedisRateLimiter(cluster.url(), {})
    broker = RedisBroker(cluster.url(), dict(LEASE))
    try:
        name = f"task-{uuid.uuid4().hex}"
        assert limiter.acquire(name, 1.0) == 0.0
        assert limiter.acquire(name, 1.0) > 0.5  # the bucket is shared: the second waits
        claims = broker.claims()
        key = f"claim-{uuid.uuid4().hex}"
        assert claims.acquire(key, "me", 30)
        assert not claims.acquire(key, "you", 30)
        holder = claims.holder(key)
        assert holder is not None and holder.owner == "me"
        claims.release(key, "me")
        assert claims.holder(key) is None
    finally:
        limiter.close()
        broker.close()


def test_dead_letters_share_their_queues_slot_and_replay(cluster: RedisClusterGroup) -> None:
    broker = RedisBroker(cluster.url(), {**LEASE, "warn_without_persistence": False})
    queue = cluster.names_on_distinct_primaries("dl", 1)[0]
    consumer = broker.consumer([queue], prefetch=0)
    try:
        broker.publish(queue, Message(b"[[], {}, {}]", {"id": "dead-1", "task": "t"}))
        got: list[Any] = []
        for _ in range(20):
            got = consumer.fetch(1, 0.5)
            if got:
                break
        consumer.reject(got[0], requeue=False, reason="test")
        assert [m.headers["id"] for m in broker.dead_letters(queue)] == ["dead-1"]
        assert broker.replay_dead_letters(queue) == 1
        assert broker.queue_length(queue) == 1
    finally:
        consumer.close()
        broker.purge(queue)
        broker.close()


@pytest.mark.slow
def test_a_tls_cluster_serves_over_rediss_cluster(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    group = RedisClusterGroup(tmp_path / "tls-cluster", certs=certs).start()
    try:
        url = group.url()
        assert url.startswith("rediss-cluster://")
        broker = RedisBroker(url, {**LEASE, "warn_without_persistence": False})
        queues = group.names_on_distinct_primaries("tls")
        consumer = broker.consumer(queues, prefetch=0)
        try:
            for q in queues:
                broker.publish(q, Message(b"[[], {}, {}]", {"id": q}))
            got: list[Any] = []
            for _ in range(40):
                got += consumer.fetch(10, 0.5)
                if len(got) >= 3:
                    break
            assert sorted(d.message.headers["id"] for d in got) == sorted(queues)
            consumer.ack(got)
        finally:
            consumer.close()
            broker.close()
        untrusting = RedisBroker(url.partition("?")[0], {"publish_retry_timeout": 0.5})
        from millpond.exceptions import BrokerError

        try:
            with pytest.raises(BrokerError, match="certificate verify failed"):
                untrusting.connect()  # the system's CAs do not trust the private one
        finally:
            untrusting.close()
    finally:
        group.stop()
