"""Private servers for tests against real software: a redis-server, a RabbitMQ node or a
PostgreSQL of the test's own, TLS certs.

The shared Redis on 6379 and the shared RabbitMQ on 5672 are never restarted or reconfigured by a
test (other test runs on the same machine use them). A test that needs to kill, restart or
password-protect Redis starts a `RedisServer` of its own on a free port, with AOF (appendfsync
always) in its own directory; a test that stops RabbitMQ, or adds users, vhosts or permissions,
uses a `RabbitServer`: a node with its own name, ports, epmd, Erlang cookie and data directory.
`make_certs` makes a private CA and a server certificate for localhost with `openssl`.
`SentinelGroup` is a sentinel-managed pair (a primary, a replica and three sentinels, all private,
on free ports) for failover tests. `PostgresServer` runs initdb and postgres on a free loopback port
with a temporary data directory; `RedisClusterGroup` is a Redis Cluster of three primaries (and
optionally one replica each) on free loopback ports, made with `redis-cli --cluster create`
(as an unprivileged user when the tests run as root, which
postgres refuses). All skip the test when the program is not installed.

Used by the broker plugins' tests and by the workspace's fault and hostile-input suites. Readiness
is checked in RESP or AMQP over a plain socket: the core depends on no Redis or AMQP client.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

__all__ = [
    "REDIS_SERVER",
    "PostgresServer",
    "RabbitCluster",
    "RabbitServer",
    "RedisClusterGroup",
    "RedisServer",
    "SentinelGroup",
    "find_postgres_bindir",
    "free_port",
    "make_certs",
    "rabbitmq_scripts",
    "resp",
]

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, with AOF (appendfsync always) in its own dir."""

    def __init__(self, workdir: Path, *extra: str, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    def args(self) -> list[str]:
        base = [str(REDIS_SERVER), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir)]
        base += ["--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.log)]
        if self.password:
            base += ["--requirepass", self.password]
        return [*base, *(self.extra or ["--port", str(self.port)])]

    def start(self, ready: Callable[[], bool] | None = None) -> RedisServer:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        check = ready or self._pings
        while not check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text() if self.log.exists() else "(no log)"
                self.stop()
                raise AssertionError(f"private redis-server did not start; its log:\n{text}")
            time.sleep(0.02)
        return self

    def _pings(self) -> bool:
        """Whether the server answers PING (after AUTH when it has a password), spoken in RESP
        over a plain socket: the helper needs no Redis client library."""
        hello = b""
        if self.password:
            pw = self.password.encode()
            hello = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(hello + b"*1\r\n$4\r\nPING\r\n")
                answer = b""
                while b"PONG" not in answer and b"-" not in answer and len(answer) < 512:
                    chunk = conn.recv(512)
                    if not chunk:
                        return False
                    answer += chunk
                return b"+PONG" in answer
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _encode(args: tuple[str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    """Just enough of RESP2 for the fixtures' own questions (strings, errors, integers, arrays)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise OSError("connection closed mid-reply")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise OSError("connection closed mid-reply")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size).decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read() for _ in range(size)]
        raise OSError(f"unexpected RESP reply {line[:40]!r}")


def resp(port: int, *args: str | int, password: str | None = None, timeout: float = 2) -> Any:
    """One command to a server on 127.0.0.1:`port`, answered in plain Python values (an error
    reply comes back as a RuntimeError instance, not raised). Spoken over a plain socket so the
    core's testing helpers need no Redis client library."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        reader = _Reader(conn)
        if password:
            conn.sendall(_encode(("AUTH", password)))
            answer = reader.read()
            if isinstance(answer, RuntimeError):
                return answer
        conn.sendall(_encode(args))
        return reader.read()


def _info(port: int, section: str, password: str | None = None) -> dict[str, str]:
    try:
        text = resp(port, "INFO", section, password=password)
    except OSError:
        return {}
    if not isinstance(text, str):
        return {}
    pairs = (line.partition(":") for line in text.splitlines() if ":" in line)
    return {k: v for k, _, v in pairs}


class SentinelGroup:
    """A primary, a replica and three sentinels (quorum 2) on free loopback ports, each in its
    own directory under `workdir`, each stopped by PID.

    Both data servers keep an AOF (appendfsync always), so what a server acknowledged survives
    its own restart; what the replica had not received yet when the primary died is the
    asynchronous-replication window that a failover can lose. Sentinels notice a dead primary
    after `down_after_ms` and promote the replica; `start()` returns once every sentinel names
    the primary, knows the replica and has seen the other two sentinels, and the replica is in
    sync, so a test's failover starts from a settled group.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        data_args: tuple[str, ...] = (),
    ) -> None:
        """`data_args`: more redis-server arguments for both data servers (for example
        `("--min-replicas-to-write", "1")`)."""
        self.dir = workdir
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.primary = RedisServer(workdir / "data-a")
        self.replica = RedisServer(workdir / "data-b")
        self.primary.extra = ["--port", str(self.primary.port), *data_args]
        self.replica.extra = [
            "--port", str(self.replica.port),
            "--replicaof", "127.0.0.1", str(self.primary.port),
            *data_args,
        ]  # fmt: skip
        self.servers = {self.primary.port: self.primary, self.replica.port: self.replica}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def sentinel_hosts(self) -> str:
        """`h1:p1,h2:p2,h3:p3` for a `redis+sentinel://` URL."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://{self.sentinel_hosts}/{db}?master_name={self.master_name}"

    def start(self, timeout: float = 30) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        for index, port in enumerate(self.sentinel_ports):
            where = self.dir / f"sentinel-{index}"
            where.mkdir(parents=True, exist_ok=True)
            conf = where / "sentinel.conf"  # sentinels rewrite their config: one file each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {where}\nlogfile {where / 'sentinel.log'}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {max(3 * self.down_after_ms, 3000)}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [str(REDIS_SERVER), str(conf), "--sentinel"], stdout=subprocess.DEVNULL
                )
            )
        self.wait_settled(timeout)
        return self

    def primary_port(self, sentinel: int = 0) -> int | None:
        """The primary's port as sentinel number `sentinel` names it now."""
        try:
            answer = resp(
                self.sentinel_ports[sentinel],
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name,
            )  # fmt: skip
        except OSError:
            return None
        return int(answer[1]) if isinstance(answer, list) and len(answer) == 2 else None

    def current_primary(self) -> RedisServer:
        port = self.primary_port()
        if port is None or port not in self.servers:
            raise AssertionError(f"the sentinels name no known primary (they say port {port})")
        return self.servers[port]

    def current_replica(self) -> RedisServer:
        primary = self.current_primary()
        return next(s for s in self.servers.values() if s is not primary)

    def _settled(self) -> bool:
        for proc in self.sentinels:
            if proc.poll() is not None:
                raise AssertionError(f"a sentinel exited with {proc.returncode}:\n{self.logs()}")
        ports = {self.primary_port(i) for i in range(len(self.sentinel_ports))}
        if len(ports) != 1 or None in ports:
            return False
        (port,) = ports
        replica = next(s for p, s in self.servers.items() if p != port)
        if replica.proc is None or replica.proc.poll() is not None:
            return False
        if _info(replica.port, "replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinel_ports:
            try:
                master = resp(sentinel, "SENTINEL", "MASTER", self.master_name)
            except OSError:
                return False
            if not isinstance(master, list):
                return False
            fields = dict(zip(master[::2], master[1::2], strict=False))
            if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                return False
            if "s_down" in fields.get("flags", "") or "o_down" in fields.get("flags", ""):
                return False
            replicas = resp(sentinel, "SENTINEL", "REPLICAS", self.master_name)
            if not isinstance(replicas, list) or not replicas:
                return False
            flags = dict(zip(replicas[0][::2], replicas[0][1::2], strict=False)).get("flags", "")
            if "down" in flags or "disconnected" in flags:
                return False
        return True

    def wait_settled(self, timeout: float = 30) -> None:
        """Wait until every sentinel agrees on the primary, sees the replica up and the other two
        sentinels, and the replica's link is up."""
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the sentinel group did not settle within {timeout:g} s:\n{self.logs()}"
                )
            time.sleep(0.05)

    def failover(self) -> None:
        """`SENTINEL FAILOVER`: a sentinel promotes the replica without asking the others."""
        answer = resp(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.master_name)
        if isinstance(answer, RuntimeError):
            raise AssertionError(f"SENTINEL FAILOVER refused: {answer}")

    def wait_primary_changed(self, old_port: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a primary other than `old_port`; returns its port."""
        deadline = time.monotonic() + timeout
        while True:
            ports = {self.primary_port(i) for i in range(len(self.sentinel_ports))}
            if len(ports) == 1 and None not in ports and old_port not in ports:
                (port,) = ports
                assert port is not None
                return port
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the sentinels still name {ports} as primary after {timeout:g} s "
                    f"(expected a new one, not {old_port}):\n{self.logs()}"
                )
            time.sleep(0.02)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*/*.log")):
            parts.append(f"--- {path.parent.name}/{path.name}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        for server in self.servers.values():
            server.stop()


class RedisClusterGroup:
    """Three primaries (and, with `replicas=1`, a replica of each) forming a Redis Cluster on free
    loopback ports, each a `RedisServer` in its own directory without persistence (a failover test
    promotes a replica instead of restarting a node). `start` waits for `cluster_state:ok` on every
    node; `stop` stops each by its process.

    With `certs` (`make_certs`' CA, certificate and key) every node also listens with TLS on a port
    of its own and the cluster bus speaks TLS; `url()` is then a `rediss-cluster://` URL of the TLS
    ports. The plain ports stay for the group's own questions (plain clients are told plain ports,
    TLS clients TLS ones)."""

    def __init__(
        self,
        workdir: Path,
        primaries: int = 3,
        replicas: int = 0,
        certs: tuple[Path, Path, Path] | None = None,
    ) -> None:
        if REDIS_SERVER is None or shutil.which("redis-cli") is None:
            pytest.skip("redis-server or redis-cli is not installed")
        self.replicas = replicas
        self.certs = certs
        self.tls_ports: list[int] = []
        self.servers: list[RedisServer] = []
        for i in range(primaries * (1 + replicas)):
            server = RedisServer(workdir / f"node-{i}")
            conf = server.dir / f"nodes-{server.port}.conf"
            server.extra = [
                "--port", str(server.port),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(conf),
                "--cluster-port", str(free_port()),  # else port + 10000, maybe taken or > 65535
                "--cluster-node-timeout", "2000",
                "--appendonly", "no",
            ]  # fmt: skip
            if certs is not None:
                ca, cert, key = certs
                self.tls_ports.append(free_port())
                server.extra += [
                    "--tls-port", str(self.tls_ports[-1]),
                    "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                    "--tls-cluster", "yes", "--tls-replication", "yes",
                ]  # fmt: skip
            self.servers.append(server)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def url(self) -> str:
        if self.certs is not None:
            nodes = ",".join(f"127.0.0.1:{p}" for p in self.tls_ports[:3])
            return f"rediss-cluster://{nodes}?ssl_ca_certs={quote(str(self.certs[0]))}"
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self, timeout: float = 60) -> RedisClusterGroup:
        try:
            for server in self.servers:
                server.start()
            command = ["redis-cli", "--cluster", "create"]
            if self.certs is not None:  # the bus speaks TLS: the nodes meet on their TLS ports
                command += [f"127.0.0.1:{p}" for p in self.tls_ports]
                command += ["--tls", "--cacert", str(self.certs[0])]
            else:
                command += [f"127.0.0.1:{p}" for p in self.ports]
            command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=timeout
            )
            if done.returncode != 0:
                raise AssertionError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self) -> bool:
        for server in self.running():
            info = _cluster_info(server.port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if info.get("cluster_known_nodes") != str(len(self.servers)):
                return False
            repl = _info(server.port, "replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        return True

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every running node says the cluster is whole (and each replica is in sync)."""
        deadline = time.monotonic() + timeout
        while not self._ok():
            if time.monotonic() > deadline:
                states = {s.port: _cluster_info(s.port).get("cluster_state") for s in self.servers}
                raise AssertionError(f"Redis Cluster not ok within {timeout:g}s: {states}")
            time.sleep(0.1)

    def slot_owner(self, slot: int) -> int:
        """The port of the primary serving `slot`, as the nodes that answer agree on it."""
        for server in self.running():
            ranges = resp(server.port, "CLUSTER", "SLOTS")
            if not isinstance(ranges, list):
                continue
            for first, last, primary, *_ in ranges:
                if int(first) <= slot <= int(last):
                    return int(primary[1])
        raise AssertionError(f"no node of the cluster serves slot {slot}")

    def running(self) -> list[RedisServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def keyslot(self, key: str) -> int:
        return int(resp(self.running()[0].port, "CLUSTER", "KEYSLOT", key))

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`: what its replica had not received yet is lost with it."""
        next(s for s in self.servers if s.port == port).kill()

    def names_on_distinct_primaries(self, prefix: str, count: int = 3) -> list[str]:
        """`count` unique names whose hash slots are served by `count` different primaries (a
        Redis Cluster queue's keys live in the slot of its name)."""
        found: dict[int, str] = {}
        base = f"{prefix}-{uuid.uuid4().hex[:8]}"
        for n in range(1000):
            name = f"{base}-{n}"
            found.setdefault(self.slot_owner(self.keyslot(name)), name)
            if len(found) == count:
                return list(found.values())
        raise AssertionError(f"no {count} names on distinct primaries among 1000 tries")

    def primary_ports(self) -> list[int]:
        return [
            s.port for s in self.servers if _info(s.port, "replication").get("role") == "master"
        ]

    def replica_of(self, primary_port: int) -> RedisServer:
        for server in self.servers:
            repl = _info(server.port, "replication")
            if repl.get("role") == "slave" and repl.get("master_port") == str(primary_port):
                return server
        raise AssertionError(f"no replica follows the primary on port {primary_port}")

    def failover(self, primary_port: int, timeout: float = 60) -> int:
        """Promote the replica of that primary (`CLUSTER FAILOVER` on it, the graceful kind: the
        primary stops taking writes until the replica caught up) and wait until the cluster is
        whole again; returns the new primary's port."""
        replica = self.replica_of(primary_port)
        answer = resp(replica.port, "CLUSTER", "FAILOVER")
        if isinstance(answer, RuntimeError):
            raise answer
        deadline = time.monotonic() + timeout
        while _info(replica.port, "replication").get("role") != "master":
            if time.monotonic() > deadline:
                raise AssertionError(f"replica {replica.port} was not promoted in {timeout:g}s")
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        # gossip reaches the nodes one by one: until every node names the new primary, a node
        # asked for a slot's owner may still answer with the old one
        while any(replica.port not in self._primaries(s.port) for s in self.running()):
            if time.monotonic() > deadline:
                raise AssertionError(f"not every node names {replica.port} a primary yet")
            time.sleep(0.05)
        return replica.port

    @staticmethod
    def _primaries(port: int) -> set[int]:
        """The primaries' ports the node at `port` lists in CLUSTER SLOTS."""
        ranges = resp(port, "CLUSTER", "SLOTS")
        return (
            {int(primary[1]) for _, _, primary, *_ in ranges} if isinstance(ranges, list) else set()
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _cluster_info(port: int) -> dict[str, str]:
    try:
        text = resp(port, "CLUSTER", "INFO")
    except OSError:
        return {}
    if not isinstance(text, str):
        return {}
    pairs = (line.partition(":") for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, _, v in pairs}


def rabbitmq_scripts() -> Path | None:
    """The directory of RabbitMQ's own scripts (`rabbitmq-server`, `rabbitmqctl`, `rabbitmq-env`).

    Debian's and Ubuntu's `rabbitmq-server` on PATH is a wrapper that switches to the `rabbitmq`
    user, its shared cookie, data and config, so it cannot run a private node; its `rabbitmqctl`
    is a symlink into the directory of the real scripts, which is found that way."""
    for program in ("rabbitmq-server", "rabbitmqctl"):
        found = shutil.which(program)
        if found is not None:
            where = Path(found).resolve().parent
            if (where / "rabbitmq-env").exists() and (where / "rabbitmq-server").exists():
                return where
    return None


def _amqp_answers(port: int) -> bool:
    """True once the node's AMQP listener answers a protocol header with a frame (Connection.Start).

    Stdlib only, so the core stays free of an AMQP client library."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


class RabbitServer:
    """A private RabbitMQ node: own node name, AMQP port, distribution port, epmd and cookie.

    Nothing is shared with the machine's RabbitMQ: `HOME` (so the Erlang cookie) is the node's
    directory, the config, enabled-plugins (none: no management plugin) and env files are its own
    (the system's `rabbitmq-env.conf` is not read), mnesia and logs live under it, epmd is a child
    process of ours on a free port (so no epmd daemon outlives the test), and every listener binds
    127.0.0.1. `start()` waits (bounded) until the node booted and AMQP answers; `stop()` asks the
    node to stop and then kills what is left by its process group, which we created. A start costs
    a few seconds: share one node per session unless a test stops it.
    """

    def __init__(
        self, workdir: Path, *, cookie: str | None = None, epmd_port: int | None = None
    ) -> None:
        """`cookie` and `epmd_port` are for cluster members (`RabbitCluster`): nodes that share
        them can reach each other; given an `epmd_port`, the node does not start epmd itself."""
        scripts = rabbitmq_scripts()
        if scripts is None:
            pytest.skip("rabbitmq-server is not installed")
        epmd = shutil.which("epmd")
        if epmd is None:
            pytest.skip("epmd (Erlang) is not on PATH")
        self.scripts = scripts
        self.epmd_program = epmd
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = f"mp-{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = epmd_port or free_port()
        self.own_epmd = epmd_port is None
        self.cookie = cookie or secrets.token_hex(20)
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "log" / f"{self.node}.log"
        self.console = self.dir / "console.log"
        self._write_files()

    def _write_files(self) -> None:
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\nlog.file.level = info\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# a private node: nothing from the system's\n")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)

    @property
    def env(self) -> dict[str, str]:
        """The environment the node and every `rabbitmqctl` call for it run with."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def url(self, user: str = "guest", password: str | None = None, vhost: str = "/") -> str:
        """An amqp:// URL for this node (guest/guest, RabbitMQ's loopback-only default user)."""
        secret = "guest" if password is None else password
        path = "/" if vhost == "/" else quote(vhost, safe="")
        return (
            f"amqp://{quote(user, safe='')}:{quote(secret, safe='')}@127.0.0.1:{self.port}/{path}"
        )

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> RabbitServer:
        if self.own_epmd and (self.epmd is None or self.epmd.poll() is not None):
            self.epmd = subprocess.Popen(
                [self.epmd_program, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        with self.console.open("ab") as console:
            self.proc = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self.env,
                cwd=self.dir,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills exactly that
            )
        deadline = time.monotonic() + timeout
        try:
            # `rabbitmqctl wait` follows the pid file until the rabbit application runs
            self.ctl("wait", str(self.dir / "node.pid"), "--timeout", str(int(timeout)))
            while not _amqp_answers(self.port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the AMQP listener did not answer")
                time.sleep(0.05)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            self.stop()
            raise AssertionError(
                f"private RabbitMQ node {self.node} did not start within {timeout:g} s ({exc});\n"
                f"{self.diagnostics()}"
            ) from None
        return self

    def diagnostics(self) -> str:
        parts = []
        for path in (self.console, self.log):
            text = path.read_text(errors="replace")[-3000:] if path.exists() else "(none)"
            parts.append(f"--- {path.name}:\n{text}")
        return "\n".join(parts)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS...` against this node only; raises with its output on failure."""
        env = self.env
        cli_port = str(free_port())  # the CLI is a distributed Erlang node too: a port of its own
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = env["RABBITMQ_CTL_DIST_PORT_MAX"] = cli_port
        done = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.node, *args],
            check=False,
            env=env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} on {self.node} failed ({done.returncode}): "
                f"{done.stdout.strip()} {done.stderr.strip()}"
            )
        return done.stdout

    def stop_app(self) -> None:
        """Stop the rabbit application (connections drop, the port closes); the node stays up."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = 60) -> None:
        """Start the rabbit application again and wait until AMQP answers."""
        self.ctl("start_app", timeout=timeout)
        deadline = time.monotonic() + timeout
        while not _amqp_answers(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node} did not answer AMQP within {timeout:g} s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def app_stopped(self) -> Iterator[None]:
        """The rabbit application stopped for the block, always started again afterwards."""
        self.stop_app()
        try:
            yield
        finally:
            self.start_app()

    def add_user(
        self,
        user: str,
        password: str,
        vhost: str = "/",
        permissions: tuple[str, str, str] | None = (".*", ".*", ".*"),
    ) -> None:
        """A user with (configure, write, read) `permissions` (regexes) on `vhost`; None: no
        access to it at all."""
        self.ctl("add_user", user, password)
        if permissions is not None:
            self.ctl("set_permissions", "-p", vhost, user, *permissions)

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    self.ctl("stop", timeout=30)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            # whatever is left of the node's process group (beam, erl_child_setup, inet_gethost)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None
        if self.epmd is not None:
            if self.epmd.poll() is None:
                self.epmd.terminate()
                try:
                    self.epmd.wait(10)
                except subprocess.TimeoutExpired:
                    self.epmd.kill()
                    self.epmd.wait(10)
            self.epmd = None


class RabbitCluster:
    """Three (or `size`) private RabbitMQ nodes joined into one cluster on this machine.

    Every node is a `RabbitServer` with its own name, AMQP port, distribution port and data
    directory; they share an Erlang cookie and one epmd (ours, on a free port), which is how they
    find each other. The nodes boot in parallel; the second and later ones then leave their app,
    `join_cluster` the first and start again. `start()` returns when the first node lists every
    node as running. `kill(i)` SIGKILLs node i's whole process group (a machine lost, no goodbye);
    `stop()` stops the nodes by PID, the epmd last.
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(20)
        self.epmd_port = free_port()
        self.nodes = [
            RabbitServer(workdir / f"node-{i}", cookie=cookie, epmd_port=self.epmd_port)
            for i in range(size)
        ]
        self.epmd: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> RabbitCluster:
        from concurrent.futures import ThreadPoolExecutor

        first = self.nodes[0]
        self.epmd = subprocess.Popen(
            [first.epmd_program, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=first.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with ThreadPoolExecutor(len(self.nodes)) as boot:
                for started in [boot.submit(n.start, timeout) for n in self.nodes]:
                    started.result()
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.node)
                node.start_app(timeout)
            deadline = time.monotonic() + timeout
            while self.running() != {n.node for n in self.nodes}:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the cluster did not form within {timeout:g} s: running "
                        f"{sorted(self.running())}"
                    )
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def running(self, via: int = 0) -> set[str]:
        """The nodes node `via` sees running in its cluster."""
        import json

        try:
            text = self.nodes[via].ctl("cluster_status", "--formatter", "json")
        except AssertionError:
            return set()
        return set(json.loads(text).get("running_nodes", []))

    def urls(self, *order: int) -> str:
        """A `;`-separated failover list of the nodes' AMQP URLs, in `order` (default: all,
        first to last)."""
        picked = order or tuple(range(len(self.nodes)))
        return ";".join(self.nodes[i].url() for i in picked)

    def kill(self, index: int) -> None:
        """SIGKILL node `index` and everything it started (its own process group)."""
        proc = self.nodes[index].proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(10)
        self.epmd = None


def make_certs(where: Path) -> tuple[Path, Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    where.mkdir(parents=True, exist_ok=True)

    def run(line: str) -> None:
        subprocess.run([openssl, *shlex.split(line)], cwd=where, check=True, capture_output=True)

    run("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=test-ca")
    run("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost")
    (where / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt "
        "-days 1 -extfile ext.cnf"
    )
    return where / "ca.crt", where / "server.crt", where / "server.key"


def find_postgres_bindir() -> Path | None:
    """The directory of the `postgres` and `initdb` binaries: $PG_BINDIR, the PATH, `pg_config
    --bindir`, or the newest of Debian's versioned directories; None when there is none."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    candidates += [Path(p) for p in reversed(debian)]
    for directory in candidates:
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory
    return None


class PostgresServer:
    """A private PostgreSQL on a free loopback port, its data in a temporary directory.

    `url` connects as the superuser `millpond` (password auth, scram-sha-256) to the database
    `millpond`. Stopped by PID (SIGINT: fast shutdown) and its directory removed by `stop()`.
    """

    user = "millpond"
    password = "pg-s3cret"  # noqa: S105 - a throw-away test server's
    database = "millpond"

    def __init__(self, *settings: str) -> None:
        bindir = find_postgres_bindir()
        if bindir is None:
            pytest.skip(
                "PostgreSQL is not installed (no postgres/initdb binaries on PATH, from "
                "pg_config or in Debian's postgresql package; set PG_BINDIR to their directory)"
            )
        self.bindir = bindir
        self.port = free_port()
        self.settings = list(settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="millpond-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root: become an unprivileged user
            try:
                who = pwd.getpwnam("postgres")
            except KeyError:
                who = pwd.getpwnam("nobody")
            self._owner = (who.pw_uid, who.pw_gid)
            os.chown(self.dir, who.pw_uid, who.pw_gid)
            self._as = [
                "setpriv", f"--reuid={who.pw_uid}", f"--regid={who.pw_gid}", "--clear-groups",
            ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args], check=False, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({done.returncode}):\n{done.stderr}")

    def start(self) -> PostgresServer:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._owner is not None:
            os.chown(pwfile, *self._owner)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        self.launch()
        self._createdb()
        return self

    def launch(self) -> PostgresServer:
        """Start postgres on the existing data directory (after `start`, or again after
        `kill`: the same port, the same data) and wait until it accepts connections."""
        args = [
            *self._as, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "max_connections=200", *self.settings,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        isready = self.bindir / "pg_isready"
        check = [str(isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-d", "postgres"]
        deadline = time.monotonic() + 30
        while subprocess.run(check, check=False, capture_output=True, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")
                self.stop()
                raise AssertionError(f"private postgres did not start; its log:\n{text}")
            time.sleep(0.05)
        return self

    def _createdb(self) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, self.database],
            check=False, capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"createdb failed: {done.stderr}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: ends sessions, then exits
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
