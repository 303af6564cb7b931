"""Private servers for tests and benchmarks: SQS (moto in server mode) and Zookeeper.

Each runs as a subprocess on a free loopback port with its data under a temp directory, is waited
for with a bounded wait that says what did not come up, and is stopped by its PID. Nothing here is
imported by the broker itself; moto and Debian's zookeeper package are test-time tools.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: where Debian's zookeeper package puts its jars and configuration
ZOOKEEPER_HOME = Path("/usr/share/zookeeper")
ZOOKEEPER_CONF = Path("/etc/zookeeper/conf")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, within: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {within:g}s")


class _Server:
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop()


class MotoServer(_Server):
    """moto's SQS in server mode: the real SQS HTTP API on 127.0.0.1 (`url` is the broker URL)."""

    def __init__(self, port: int | None = None, *, authenticate: bool = False) -> None:
        self.port = port or free_port()
        #: check every request's credentials against moto's IAM (none are known: all refused)
        self.authenticate = authenticate

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"sqs://testing:testing@127.0.0.1:{self.port}"

    #: options a broker needs for this endpoint (plain HTTP)
    options = {"is_secure": False, "region": "us-east-1"}

    def start(self) -> MotoServer:
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")  # noqa: S106 - moto's fake
        if self.authenticate:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        _wait_port(self.port, 30, "moto_server", self.proc)
        return self

    def __enter__(self) -> MotoServer:
        return self.start()


def zookeeper_missing() -> str | None:
    """Why a Zookeeper server cannot be started here, or None when it can."""
    if not (ZOOKEEPER_HOME / "bin" / "zkServer.sh").exists() and not list(
        ZOOKEEPER_HOME.glob("*.jar")
    ):
        return "Zookeeper is not installed (apt-get install zookeeper; .ci/run does it)"
    if shutil.which("java") is None:
        return "java is not installed (Debian's zookeeper package brings it)"
    return None


class ZookeeperServer(_Server):
    """A standalone Zookeeper from Debian's package, its data in a temp directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="millpond-zk-"))

    @property
    def url(self) -> str:
        return f"zookeeper://127.0.0.1:{self.port}/millpond"

    def start(self) -> ZookeeperServer:
        missing = zookeeper_missing()
        if missing:
            raise RuntimeError(missing)
        data = self.tmp / "data"
        data.mkdir()
        cfg = self.tmp / "zoo.cfg"
        cfg.write_text(
            f"tickTime=500\ndataDir={data}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\n"
            "4lw.commands.whitelist=ruok\nmaxSessionTimeout=10000\nminSessionTimeout=1000\n"
        )
        log4j = ZOOKEEPER_CONF / "log4j.properties"
        classpath = ":".join(
            [str(ZOOKEEPER_CONF), *(str(p) for p in sorted(ZOOKEEPER_HOME.glob("*.jar")))]
            + [str(p) for p in sorted((ZOOKEEPER_HOME / "lib").glob("*.jar"))]
            + [str(p) for p in sorted(Path("/usr/share/java").glob("*.jar"))]
        )
        cmd = [
            "java",
            "-Xmx256m",
            f"-Dzookeeper.log.dir={self.tmp}",
            "-Dzookeeper.root.logger=WARN,CONSOLE",
            "-cp",
            classpath,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(cfg),
        ]
        if log4j.exists():
            cmd.insert(1, f"-Dlog4j.configuration=file:{log4j}")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.tmp
        )
        _wait_port(self.port, 60, "zookeeper", self.proc)
        return self

    def stop(self) -> None:
        self._stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ZookeeperServer:
        return self.start()
