"""docs/django.md runs as written: its files (the ```python blocks that start with `# <path>`)
make a project in a temporary directory, Django makes its tables, a real worker starts on it and
the page's sending block, run through `manage.py shell`, gets its row written; its results block
reads what the worker stored in the TaskResult table, and the row of its schedule block is
ticked by a real `millpond beat`."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from processes import BeatProcess

from millpond.testing.harness import WorkerProcess, wait_until

DOC = Path(__file__).resolve().parents[3] / "docs" / "django.md"

MANAGE_PY = """import os
import sys

from django.core.management import execute_from_command_line

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
execute_from_command_line(sys.argv)
"""


@pytest.mark.e2e
def test_the_documented_project_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    files = {b.splitlines()[0][2:].strip(): b for b in blocks if re.match(r"# \S+\.py\n", b)}
    assert set(files) >= {"proj/settings.py", "proj/millpond.py", "shop/models.py", "shop/tasks.py"}
    (sending,) = [b for b in blocks if "delay_on_commit" in b and not b.startswith("# ")]
    (results,) = [b for b in blocks if "TaskResult.objects" in b]
    (schedule,) = [b for b in blocks if "PeriodicTask.objects.create" in b]
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (tmp_path / "manage.py").write_text(MANAGE_PY)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "DJANGO_", "OTEL_"))
    }
    env["PYTHONPATH"] = str(tmp_path)

    def manage(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"manage.py {' '.join(args)}:\n{proc.stderr[-4000:]}"
        return proc.stdout

    manage("makemigrations", "shop", "-v0")
    manage("migrate", "-v0")
    worker = WorkerProcess(
        ["-A", "proj.millpond:app", "-P", "threads", "-c", "8"],
        {"PYTHONPATH": str(tmp_path)},
        tmp_path,
        cwd=tmp_path,
    )
    try:
        worker.wait_ready()
        manage("shell", "-v0", "-c", sending)

        def notes() -> list[str]:
            with sqlite3.connect(tmp_path / "db.sqlite3") as db:
                return [row[0] for row in db.execute("select text from shop_note")]

        wait_until(lambda: notes() == ["order placed"], 30, "the worker to write the note")
        out = manage("shell", "-v0", "-c", results)
        assert "SUCCESS True shop.tasks.write_note" in out, out
        manage("shell", "-v0", "-c", schedule)
        beat = BeatProcess({"PYTHONPATH": str(tmp_path)}, tmp_path, "proj.millpond:app")
        try:
            wait_until(
                lambda: beat.alive() and notes().count("tick") >= 2,
                60,
                "beat to tick the documented row twice (and the worker to write its notes)",
            )
        finally:
            beat.stop()
    finally:
        worker.stop()
