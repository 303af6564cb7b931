"""Session fixtures: the workspace wheels, built once, and the few clean venvs the tests share.

Building a venv costs seconds, so there are three, each made on first use and reused:

* `threads_redis_venv`: millpond + millpond-pool-threads + millpond-broker-redis, what a Redis
  user of the threads pool installs;
* `core_venv`: millpond alone;
* `thirdparty_venv`: `millpond[asyncio]` (the extra pulls the asyncio pool), pytest, and a pool
  made by `millpond new-pool`, both installed as any third-party package would be.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.install.venvs import PACKAGES, ROOT, Venv, build_wheels

APP = textwrap.dedent('''
    """The app the installed workers run."""
    import threading

    from millpond import Millpond

    app = Millpond("installed")


    @app.task(name="inst.add")
    def add(x, y):
        return x + y


    @app.task(name="inst.where")
    def where():
        return threading.current_thread().name
''')


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels of the workspace packages the install tests need, built once per session."""
    out = tmp_path_factory.mktemp("wheelhouse")
    return build_wheels([ROOT / path for path in PACKAGES.values()], out)


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the app module (and no millpond.toml)."""
    path = tmp_path_factory.mktemp("app")
    (path / "instapp.py").write_text(APP)
    return path


@pytest.fixture(scope="session")
def threads_redis_venv(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: dict[str, Path]
) -> Venv:
    root = tmp_path_factory.mktemp("venvs") / "threads-redis"
    wheels = [wheelhouse[n] for n in ("millpond", "millpond-pool-threads", "millpond-broker-redis")]
    return Venv.create(root, [str(w) for w in wheels], wheelhouse["millpond"].parent)


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory: pytest.TempPathFactory, wheelhouse: dict[str, Path]) -> Venv:
    root = tmp_path_factory.mktemp("venvs") / "core-only"
    return Venv.create(root, [str(wheelhouse["millpond"])], wheelhouse["millpond"].parent)


@pytest.fixture(scope="session")
def scaffolded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package `millpond new-pool ripple` writes, untouched."""
    from millpond_cli.scaffold import create_pool

    return create_pool("ripple", tmp_path_factory.mktemp("scaffold")).root


@pytest.fixture(scope="session")
def thirdparty_venv(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: dict[str, Path], scaffolded: Path
) -> Venv:
    """millpond[asyncio] from the wheel (the extra resolves the asyncio pool from the wheelhouse),
    pytest for the kit, and the scaffolded pool built as a wheel and installed like any other."""
    links = wheelhouse["millpond"].parent
    built = build_wheels([scaffolded], tmp_path_factory.mktemp("scaffold-wheel"))
    root = tmp_path_factory.mktemp("venvs") / "third-party"
    requirements = [
        f"{wheelhouse['millpond']}[asyncio]",
        "pytest",
        str(built["millpond-pool-ripple"]),
    ]
    return Venv.create(root, requirements, links)
