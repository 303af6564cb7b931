"""The `[health]` section, the banner line and the shared server, in-process."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from millpond import Millpond
from millpond.config.settings import load_settings
from millpond.consume.worker import Worker
from millpond.exceptions import ConfigurationError
from millpond_cli.main import banner
from millpond_health import server
from millpond_health.hooks import HealthHooks
from millpond_health.settings import SECTION


def _get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_section_from_every_source(tmp_path: Path) -> None:
    file = tmp_path / "millpond.toml"
    file.write_text("[health]\nport = 8080\nhost = '127.0.0.1'\n")
    from_file = load_settings(env={}, file=file)
    assert from_file.section(SECTION)["port"] == 8080
    assert from_file.section(SECTION)["host"] == "127.0.0.1"
    assert from_file.sources["health.port"] == f"file {file}"
    from_env = load_settings(
        env={"MILLPOND_HEALTH__PORT": "9000", "MILLPOND_HEALTH__LIVENESS_TIMEOUT": "5"}, file=file
    )
    assert from_env.section(SECTION)["port"] == 9000
    assert from_env.section(SECTION)["liveness_timeout"] == 5.0
    from_code = load_settings(env={}, code={"health": {"port": 7000}})
    assert from_code.section(SECTION)["port"] == 7000
    from_flag = load_settings({"health.port": 6000}, env={"MILLPOND_HEALTH__PORT": "9000"})
    assert from_flag.section(SECTION)["port"] == 6000
    assert load_settings(env={}).section(SECTION) == {
        "port": None,
        "host": "0.0.0.0",
        "liveness_timeout": 30.0,
    }


def test_a_bad_port_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="too large; expected a whole number from 0 to"):
        load_settings(env={"MILLPOND_HEALTH__PORT": "70000"})


def test_the_banner_shows_where_the_health_endpoint_listens(memory_app: Millpond) -> None:
    quiet = Worker(memory_app, settings=load_settings({"pool": "solo"}, env={}))
    assert "health:" not in banner(quiet)
    probed = Worker(
        memory_app,
        settings=load_settings({"pool": "solo"}, env={"MILLPOND_HEALTH__PORT": "8080"}),
    )
    assert "  health:      http://0.0.0.0:8080/livez, /readyz" in banner(probed)


def test_the_hooks_serve_the_probes_of_a_worker_and_stop_them(memory_app: Millpond) -> None:
    settings = load_settings(
        {"pool": "solo"}, env={"MILLPOND_HEALTH__PORT": "0", "MILLPOND_HEALTH__HOST": "127.0.0.1"}
    )
    worker = Worker(memory_app, settings=settings)
    hooks = HealthHooks()
    hooks.worker_ready(worker)
    (probe_server,) = server._servers[id(worker)].values()
    port = probe_server.port
    code, body = _get(port, "/readyz")
    assert code == 503  # a Worker object that never started is not ready
    assert json.loads(body)["checks"]["started"] is False
    assert _get(port, "/livez")[0] == 503  # its loop never turned
    hooks.worker_stopped(worker)
    assert id(worker) not in server._servers
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_hooks_asking_for_one_port_share_one_server(memory_app: Millpond) -> None:
    worker = Worker(memory_app, settings=load_settings({"pool": "solo"}, env={}))

    def ok() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok"

    def boom() -> tuple[int, str, bytes]:
        raise RuntimeError("no scrape today")

    try:
        first = server.serve(worker, "127.0.0.1", 0, {"/a": ok})
        same = server.serve(worker, "127.0.0.1", 0, {"/b": boom})
        assert same is first
        assert _get(first.port, "/a") == (200, b"ok")
        code, body = _get(first.port, "/b")
        assert code == 500  # a route that raises is reported; the server goes on
        assert json.loads(body) == {"error": "RuntimeError: no scrape today"}
        code, body = _get(first.port, "/nope")
        assert code == 404
        assert json.loads(body)["routes"] == ["/a", "/b"]
        assert _get(first.port, "/a") == (200, b"ok")
    finally:
        server.stop_serving(worker)


def test_a_port_in_use_is_a_clear_error(memory_app: Millpond) -> None:
    worker = Worker(memory_app, settings=load_settings({"pool": "solo"}, env={}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=rf"cannot listen on 127.0.0.1:{port} .*"):
            server.serve(worker, "127.0.0.1", port, {})
    assert server._servers.pop(id(worker), {}) == {}
