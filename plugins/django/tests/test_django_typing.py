"""`delay_on_commit` is visible to mypy on a `DjangoMillpond`'s tasks, and checked against the
task function's parameters: a sample module is type-checked by the installed mypy (strict, a
config and cache of its own in a temp dir), as core/tests/test_typing.py does for `Task`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

SAMPLE = textwrap.dedent("""\
    from typing import Any, assert_type

    from millpond import AsyncResult, Task
    from millpond_django import DjangoMillpond, DjangoTask

    app = DjangoMillpond("typing-sample", broker_url="memory://typing-sample")


    @app.task
    def add(x: int, y: int) -> int:
        return x + y


    @app.task(queue="orders")
    def ship(order_id: str) -> None: ...


    @app.task(bind=True)
    def charge(self: Task[Any, Any], order_id: str, cents: int) -> bool:
        return True


    typed: DjangoTask[[int, int], int] = add
    assert_type(add.delay(1, 2), AsyncResult[int])
    assert_type(add.delay_on_commit(1, 2), None)
    ship.delay_on_commit("o-1")
    charge.delay_on_commit("o-1", 100)
    charge.apply_async_on_commit(("o-1", 100), using="default", countdown=5)
    plain: Task[[int, int], int] = add  # still a Task

    add.delay_on_commit(1, "2")  # E: arg-type
    ship.delay_on_commit()  # E: call-arg
    charge.delay_on_commit("o-1", cents="a")  # E: arg-type
""")


def test_delay_on_commit_is_typed_with_the_task_parameters(tmp_path: Path) -> None:
    (tmp_path / "sample.py").write_text(SAMPLE)
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nstrict = True\n\n[mypy-django.*]\nignore_missing_imports = True\n"
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
            "--cache-dir", str(tmp_path / ".mypy_cache"), "--no-error-summary",
            "--show-error-codes", str(tmp_path / "sample.py"),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    got = sorted(
        (int(m[1]), m[2]) for m in re.finditer(r"sample\.py:(\d+): error: .*\[([\w-]+)\]$",
                                               proc.stdout, re.M)
    )  # fmt: skip
    expected = sorted(
        (n, m[1])
        for n, line in enumerate(SAMPLE.splitlines(), 1)
        if (m := re.search(r"# E: ([\w-]+)$", line))
    )
    assert got == expected, proc.stdout
