"""docs/beat.md runs as written: its Python blocks in a fresh interpreter, and its millpond.toml
example read by the real settings system and checked as `millpond beat` checks it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.docs_runner import DOCS, clean_env, run_guide

DOC = DOCS / "beat.md"


def test_the_python_blocks_run(tmp_path: Path) -> None:
    run_guide(DOC, clean_env(), module="docs_beat", cwd=tmp_path)


def test_the_settings_example_is_read_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from millpond import Millpond
    from millpond.config.settings import load_settings
    from millpond_beat.command import build_entries

    (block,) = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    path = tmp_path / "millpond.toml"
    path.write_text(block + "\n[beat]\n" if "[beat]" not in block else block)
    app = Millpond("shop", broker_url="memory://docs-beat-toml")
    for name in ("shop.tasks.backup", "shop.tasks.ping"):
        app.task(name=name)(lambda **_: None)
    app.configure(load_settings(file=path, env={}))
    entries = build_entries(app, app.settings)
    assert set(entries) == {"nightly backup", "ping"}
    backup = entries["nightly backup"]
    assert backup.zone_name == "Europe/Berlin"
    assert dict(backup.options) == {"queue": "maintenance"}
    assert backup.expires == 3600
