"""Running a guide's Python blocks as written, in a fresh interpreter, against a real worker.

Every guide with a runnable example has a test that executes its ```python blocks in order in one
namespace, in a subprocess with a clean environment (no MILLPOND_/OTEL_ variables of the
developer's shell), next to a `millpond worker` subprocess where the guide needs one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.harness import ROOT

DOCS = ROOT / "docs"

#: argv: the guide, the heading its blocks start after ("" for all), the module name the blocks
#: run as ("" leaves `__name__` unset, as for code typed into `exec`)
_RUNNER = r"""
import re, sys
from pathlib import Path
path, start, module = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
text = path.read_text()
if start:
    text = text[text.index(start):]
namespace = {"__name__": module} if module else {}
for number, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
    try:
        exec(compile(block, f"{path.name} block {number}", "exec"), namespace)
    except Exception as exc:
        raise SystemExit(f"block {number} failed: {type(exc).__name__}: {exc}\n{block}")
print("all blocks ran")
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MILLPOND_/OTEL_ settings, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLPOND_", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_guide(
    guide: Path,
    env: dict[str, str],
    *,
    start: str = "",
    module: str = "",
    cwd: Path = ROOT,
    timeout: float = 120,
    worker_log: Path | None = None,
) -> str:
    """Run `guide`'s Python blocks; fails with their output (and the worker's log, if given)
    unless every block ran. Returns what the blocks printed."""
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(guide), start, module],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode != 0 or "all blocks ran" not in done.stdout:
        log = worker_log.read_text(errors="replace")[-4000:] if worker_log else ""
        raise AssertionError(f"{guide.name}: {done.stdout[-4000:]}{done.stderr[-4000:]}\n{log}")
    return done.stdout


@contextmanager
def guide_worker(args: Sequence[str], env: dict[str, str], log_path: Path) -> Iterator[Path]:
    """A `millpond worker` with these arguments for the length of the block, stopped warm
    (SIGTERM, then waited for) by its PID; yields the path of its log."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "millpond", "worker", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield log_path
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
                raise AssertionError(
                    f"the worker did not stop within 30 s of SIGTERM:\n{log_path.read_text()}"
                ) from None


def forget_redis_queue(url: str, queue: str, *keys: str) -> None:
    """Delete what a test's queue left on the shared Redis (its dead letters and delays too)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.delete(queue, f"{queue}.dead", f"millpond:delayed:{queue}", *keys)
    finally:
        client.close()
