"""The plugin loader: stevedore lists without importing, loads by name or by group, and says what
to do when a plugin is missing or does not fit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from millpond import __version__
from millpond.config import plugins
from millpond.config.options import Section
from millpond.contracts.pool import BasePool
from millpond.exceptions import PluginLoadError, PluginNotFound

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_the_loader_does_not_import_the_cli() -> None:
    proc = run(
        "import sys, millpond.config.plugins as p; p.installed(p.POOLS); p.load(p.POOLS, 'solo');"
        "print(sorted(m for m in sys.modules if m.startswith('millpond_cli')))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_listing_imports_nothing() -> None:
    proc = run(
        "import sys, millpond.config.plugins as p\n"
        "rows = [p.describe(ep) for group in p.GROUPS for ep in p.entry_points(group)]\n"
        "assert {'gevent', 'eventlet', 'prefork'} <= {r.name for r in rows}\n"
        "print(sorted(m for m in sys.modules if m.startswith(('millpond_', 'gevent', 'eventlet'))))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_load_all_loads_a_group_or_the_named_ones_in_order() -> None:
    named = plugins.load_all(plugins.POOLS, ["threads", "solo"])
    assert [name for name, _ in named] == ["threads", "solo"]
    assert all(isinstance(cls, type) and issubclass(cls, BasePool) for _, cls in named)
    every = plugins.load_all(plugins.SETTINGS)
    assert [name for name, _ in every] == plugins.installed(plugins.SETTINGS)
    assert all(isinstance(section, Section) for _, section in every)
    assert plugins.load_all(plugins.HOOKS, []) == []


def test_a_missing_name_lists_what_is_installed() -> None:
    with pytest.raises(PluginNotFound) as info:
        plugins.load_all(plugins.POOLS, ["solo", "nosuch"])
    assert "no pool named 'nosuch' is installed (installed: asyncio, eventlet" in str(info.value)
    with pytest.raises(PluginNotFound, match="no broker named 'kafka' is installed"):
        plugins.broker_for_url("kafka://h")


def test_a_missing_first_party_hook_names_its_package() -> None:
    # every first-party hook is installed here, so the message is made as for a venv without one
    with pytest.raises(PluginNotFound) as info:
        plugins._raise_missing(plugins.HOOKS, ["metrics"])
    assert str(info.value).endswith(
        "install it with: pip install millpond-metrics, or fix the hooks setting"
    )
    with pytest.raises(PluginNotFound, match=r"no hooks named 'nosuch' .*; fix the hooks setting$"):
        plugins.load_hooks(["nosuch"])


def test_redis_cluster_urls_find_the_redis_broker() -> None:
    from millpond_broker_redis import RedisBroker

    for url in ("redis-cluster://127.0.0.1:7000,127.0.0.1:7001", "rediss-cluster://h:7000"):
        broker = plugins.broker_for_url(url)  # built without connecting
        try:
            assert isinstance(broker, RedisBroker) and broker.cfg.cluster
        finally:
            broker.close()


def test_sections_are_found_by_the_name_of_what_they_configure() -> None:
    from millpond_broker_redis.settings import SECTION as REDIS

    for name in ("redis", "rediss", "redis+sentinel"):
        assert plugins.settings_section(name) is REDIS
    assert plugins.settings_section("solo") is None


def test_an_entry_point_naming_the_wrong_kind_of_object_is_refused() -> None:
    with pytest.raises(PluginLoadError, match="does not name a BasePool subclass"):
        plugins._verify(plugins.POOLS, "odd", object)
    with pytest.raises(PluginLoadError, match="does not name a millpond Section"):
        plugins._verify(plugins.SETTINGS, "odd", {"not": "a section"})
    with pytest.raises(PluginLoadError, match="does not name a WorkerComponent subclass"):
        plugins._verify(plugins.COMPONENTS, "odd", object)
    with pytest.raises(PluginLoadError, match="app client 'odd' is not callable"):
        plugins._verify(plugins.CLIENTS, "odd", 42)


def test_a_plugin_for_another_core_is_refused_before_its_module_is_imported(
    tmp_path: Path,
) -> None:
    """Its import-time code may not run against a core it was not built for: the range comes from
    its installed metadata, and the module, if imported, ends the process."""
    dist = tmp_path / "millpond_pool_future-3.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: millpond-pool-future\nVersion: 3.0\n"
        "Requires-Dist: millpond>=9,<10\n"
    )
    (dist / "entry_points.txt").write_text("[millpond.pools]\nfuture = millpond_pool_future:Pool\n")
    (tmp_path / "millpond_pool_future.py").write_text(
        "import os, sys\nsys.stderr.write('millpond_pool_future was imported')\nos._exit(3)\n"
    )
    code = textwrap.dedent("""
        import sys
        from millpond.config import plugins
        from millpond.exceptions import PluginLoadError
        for names in (["solo", "future"], None):
            try:
                plugins.load_all(plugins.POOLS, names)
            except PluginLoadError as err:
                print(err)
        print("millpond_pool_future" in sys.modules)
    """)
    proc = run(
        code, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    )
    assert proc.returncode == 0, proc.stderr
    refusal = (
        "pool 'future' from millpond-pool-future 3.0 needs millpond>=9,<10, but millpond "
        f"{__version__} is installed; upgrade one of them so they match"
    )
    assert proc.stdout.splitlines() == [refusal, refusal, "False"]
