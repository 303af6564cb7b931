"""`delay_on_commit` is visible to mypy on a `DjangoMillpond`'s tasks, and checked against the
task function's parameters.

Like core/tests/test_typing.py, with the same runner (`millpond.testing.typecheck`): two samples,
one strict mypy run with a config of its own; the good one must pass clean, the bad one must give
exactly the errors its `# E:` markers say, message and code, on exactly those lines.
"""

from __future__ import annotations

import textwrap

import pytest

from millpond.testing.typecheck import expected_errors, strict_mypy

#: the app and its three kinds of task, the same in both samples
TASKS = textwrap.dedent("""\
    app = DjangoMillpond("typing-sample", broker_url="memory://typing-sample")


    @app.task
    def add(x: int, y: int) -> int:
        return x + y


    @app.task(queue="orders")
    def ship(order_id: str) -> None: ...


    @app.task(bind=True)
    def charge(self: Task[Any, Any], order_id: str, cents: int) -> bool:
        return True


""")

DJANGO_OK = (
    textwrap.dedent('''\
    """Typed tasks of a DjangoMillpond; mypy --strict must report nothing."""

    from typing import Any, assert_type

    from millpond import AsyncResult, Task
    from millpond_django import DjangoMillpond, DjangoTask

''')
    + TASKS
    + textwrap.dedent("""\
    typed: DjangoTask[[int, int], int] = add
    assert_type(add.delay(1, 2), AsyncResult[int])
    assert_type(add.delay_on_commit(1, 2), None)
    ship.delay_on_commit("o-1")
    charge.delay_on_commit("o-1", 100)
    charge.apply_async_on_commit(("o-1", 100), using="default", countdown=5)
    plain: Task[[int, int], int] = add  # still a Task
""")
)

DJANGO_BAD = (
    textwrap.dedent('''\
    """Mistakes mypy --strict must report on delay_on_commit, each where the markers say."""

    from typing import Any

    from millpond import Task
    from millpond_django import DjangoMillpond

''')
    + TASKS
    + textwrap.dedent("""\
    add.delay_on_commit(1, "2")  # E: Argument 2 to "delay_on_commit" of "DjangoTask" has incompatible type "str"; expected "int"  [arg-type]
    ship.delay_on_commit()  # E: Missing positional argument "order_id" in call to "delay_on_commit" of "DjangoTask"  [call-arg]
    charge.delay_on_commit("o-1", cents="a")  # E: Argument "cents" to "delay_on_commit" of "DjangoTask" has incompatible type "str"; expected "int"  [arg-type]
""")
)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    samples = {"django_ok.py": DJANGO_OK, "django_bad.py": DJANGO_BAD}
    return strict_mypy(tmp_path_factory.mktemp("django-typing"), samples)


def test_delay_on_commit_is_typed_with_the_task_parameters(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("django_ok.py", []) == []


def test_wrong_delay_on_commit_calls_are_reported_where_marked(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("django_bad.py", []) == expected_errors(DJANGO_BAD)
