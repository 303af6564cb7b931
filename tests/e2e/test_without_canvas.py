"""A worker whose environment lacks the canvas plugin (a user removed millpond-canvas).

The worker runs in an interpreter that sees every installed distribution but millpond-canvas: a
site directory of links to this environment's, without the canvas's metadata and import hook, so
neither its entry point nor its package can be found, as after `pip uninstall millpond-canvas`.
A message with canvas fields can never finish there; it is dead-lettered at once with a reason
naming the package, instead of running and going back to the queue on every delivery.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from millpond.testing.harness import WorkerProcess, wait_until
from millpond.wire.protocol import DEATH_REASON
from tests.e2e.harness import ROOT

_RUN = (
    "import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'millpond'; "
    "runpy.run_module('millpond', run_name='__main__')"
)


def _site_without_canvas(directory: Path) -> Path:
    """Links to every entry of this environment's site-packages but millpond-canvas's."""
    view = directory / "site-packages"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "millpond_canvas" in entry.name.replace("-", "_").lower():
            continue
        (view / entry.name).symlink_to(entry)
    return view


class _CanvaslessWorker(WorkerProcess):
    """A solo worker whose interpreter sees `view` instead of the real site-packages."""

    def __init__(self, view: Path, env: dict[str, str], directory: Path) -> None:
        self.view = view
        super().__init__(["-A", "tests.e2e.app:app", "--pool", "solo"], env, directory, cwd=ROOT)

    def command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-S", "-c", _RUN, str(self.view), "worker", "--no-banner", *args]


def test_canvas_fields_without_the_canvas_plugin_are_dead_lettered_naming_the_package(
    tmp_path: Path, e2e_env: dict[str, str], producer: Any
) -> None:
    from tests.e2e.app import add

    view = _site_without_canvas(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-S", "-c", _RUN, str(view), "plugins"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert "millpond-canvas" not in probe.stdout  # the plugin is really gone for the worker

    queue = e2e_env["MILLPOND_QUEUES"]
    linked = add.apply_async((1, 2), link=add.s(10))  # a callback: a canvas field
    worker = _CanvaslessWorker(view, {**e2e_env, "MILLPOND_MAX_DELIVERIES": "3"}, tmp_path)
    try:
        worker.wait_ready(30)
        plain = add.delay(2, 3)
        assert plain.get(timeout=20) == 5  # plain tasks still run
        dead = wait_until(lambda: producer.broker.dead_letters(queue), 20, "a dead letter")
        assert [m.task_id for m in dead] == [linked.id]
        reason = dead[0].headers[DEATH_REASON]
        assert "carries canvas fields (callbacks)" in reason
        assert "pip install millpond-canvas" in reason
        # refused before it ran, once: no result, no canvas step tried, no second delivery
        assert linked.state == "PENDING"
        assert not [line for line in worker.lines() if "canvas" in str(line.get("event"))]
        refused = [
            line
            for line in worker.lines()
            if line.get("event") == "message rejected to the dead-letter queue"
        ]
        assert [line.get("task_id") for line in refused] == [linked.id]
    finally:
        worker.stop()
