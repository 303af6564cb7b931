"""Typed tasks: `mypy --strict` accepts every supported form and reports the mistakes it should.

Two sample modules are written to a temp dir and checked by one run of the installed mypy (its
cache in the same temp dir, so a run is a couple of seconds and never touches the workspace's):

* `typed_ok.py` uses every supported form (bare decorator, options, `bind=True`, `async def`,
  `delay`/`apply_async`/`get`, `send_task`) and pins the inferred types with `assert_type`; it must
  pass clean, and it is imported for real too, so what mypy accepts the runtime accepts.
* `typed_bad.py` holds the mistakes; each line that must fail ends in `# E: <message>  [<code>]`
  (one marker per expected error), and the test asserts exactly those errors on exactly those
  lines: a missing error, an extra one, or a different one fails it.

The samples live in strings rather than files so that ruff and pytest leave them alone (the bad
one is full of unused variables and wrong calls on purpose).
"""

from __future__ import annotations

import importlib.util
import inspect
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from millpond import Millpond, SendOptions, Task, TaskDecoratorOptions
from millpond.produce.task import SEND_OPTIONS, TASK_OPTIONS
from millpond.testing.typecheck import expected_errors, strict_mypy

ROOT = Path(__file__).resolve().parents[2]

TYPED_OK = textwrap.dedent('''\
    """Every supported form of a typed task; mypy --strict must report nothing."""

    from collections.abc import Coroutine
    from datetime import UTC, datetime
    from typing import Any, Unpack, assert_type

    from millpond import AsyncResult, Millpond, Request, SendOptions, Task, TaskDecoratorOptions

    app = Millpond("typing-sample", broker_url="memory://typing-sample")
    SHARED: TaskDecoratorOptions = {"queue": "shared", "max_retries": 2}


    @app.task
    def add(x: int, y: int) -> int:
        return x + y


    @app.task()
    def negate(x: int) -> int:
        return -x


    @app.task(**SHARED)
    def square(x: int) -> int:
        return x * x


    @app.task(name="sample.resize", queue="images", time_limit=60, soft_time_limit=50.5)
    def resize(path: str, width: int = 100) -> str:
        return f"{path}@{width}"


    @app.task(
        acks_late=False,
        max_retries=None,
        default_retry_delay=5,
        autoretry_for=(ConnectionError, TimeoutError),
        retry_backoff=2,
        retry_backoff_max=60.0,
        retry_jitter=False,
        ignore_result=True,
        expires=3600,
        reject_on_worker_lost=False,
        max_deliveries=3,
        priority=5,
    )
    def notify(user_id: int, *, urgent: bool = False) -> None:
        pass


    @app.task(autoretry_for=ConnectionError)  # one exception class, not a tuple
    def ping() -> bool:
        return True


    @app.task(bind=True, max_retries=5)
    def charge(self: Task[Any, Any], order_id: str, amount: float) -> dict[str, object]:
        assert_type(self.request, Request)
        if self.request.retries < 1:
            self.retry(countdown=2**self.request.retries, exc=ConnectionError("gateway"))
        return {"order_id": order_id, "charged": amount}


    @app.task(bind=True)
    def fib(self: Task[[int], int], n: int) -> int:
        return n if n < 2 else self(n - 1) + self(n - 2)


    @app.task
    async def fetch(url: str) -> bytes:
        return url.encode()


    @app.task(bind=True, queue="io")
    async def fetch_bound(self: Task[Any, Any], url: str) -> bytes:
        return self.request.id.encode() + url.encode()


    def double(x: int) -> int:
        return 2 * x


    doubled = app.task(double, name="sample.double")
    charged_again = app.task(charge.fn, bind=True, name="sample.charge_again")


    def send_later(task: Task[[int, int], int], **options: Unpack[SendOptions]) -> int:
        return task.apply_async((1, 2), **options).get()


    def check() -> None:  # type-checked, never run: it would wait for a worker
        as_task: Task[[int, int], int] = add
        assert_type(as_task(1, 2), int)
        assert_type(add.delay(2, 3), AsyncResult[int])
        assert_type(add.delay(2, y=3).get(), int)
        assert_type(add.delay(2, 3).get(timeout=10), int)
        assert_type(add.delay(2, 3).get(10, propagate=False), int | BaseException)
        assert_type(add.delay(2, 3).get(10, True), int)
        assert_type(add.apply_async((2, 3)).get(), int)
        assert_type(negate.delay(1).get(), int)
        assert_type(square.delay(1).get(), int)
        assert_type(resize.delay("a.png").get(), str)
        assert_type(notify.delay(1, urgent=True), AsyncResult[None])
        assert_type(ping.delay().get(), bool)
        assert_type(charge("o-1", 9.5), dict[str, object])
        assert_type(charge.delay("o-1", 9.5).get(), dict[str, object])
        assert_type(fib.delay(10).get(), int)
        coroutine: Coroutine[Any, Any, bytes] = fetch("x")  # calling it here gives the coroutine
        coroutine.close()
        assert_type(fetch.delay("x").get(), bytes)  # the worker awaits it and stores the bytes
        assert_type(fetch.apply_async(("x",), queue="io").get(), bytes)
        assert_type(fetch_bound.delay("x").get(), bytes)
        assert_type(doubled.delay(2).get(), int)
        assert_type(charged_again.delay("o", 1.0).get(), dict[str, object])
        assert_type(send_later(add, queue="later", countdown=10), int)

        result = add.apply_async(
            (1, 2),
            {},
            queue="urgent",
            countdown=30,
            eta=datetime.now(UTC),
            expires=60,
            headers={"x-origin": "sample"},
            task_id="fixed-id",
            time_limit=10,
            soft_time_limit=5,
            ignore_result=False,
            priority=1,
            retries=0,
        )
        assert_type(result.id, str)
        assert_type(result.status, str)
        assert_type(result.ready(), bool)
        assert_type(result.successful(), bool)
        assert_type(result.failed(), bool)
        assert_type(result.traceback, str | None)
        assert_type(result.result, Any)
        result.forget()

        assert_type(app.send_task("sample.add", [2, 3], queue="q"), AsyncResult[Any])
        assert_type(app.AsyncResult("some-id"), AsyncResult[Any])

        def first(task: Task[[int], object]) -> object:
            return task.delay(1).get()

        first(doubled)  # covariant in the result type
        wider: AsyncResult[object] = add.delay(1, 2)
        assert wider
''')

TYPED_BAD = textwrap.dedent('''\
    """Mistakes mypy --strict must report, each where the `# E:` markers say."""

    from typing import Any

    from millpond import AsyncResult, Millpond, Task

    app = Millpond("typing-errors", broker_url="memory://typing-errors")
    options: dict[str, Any] = {"queue": "q"}


    @app.task
    def add(x: int, y: int) -> int:
        return x + y


    @app.task
    async def fetch(url: str) -> bytes:
        return url.encode()


    @app.task(bind=True)
    def charge(self: Task[Any, Any], order_id: str) -> None:
        self.retry(countdwn=1)  # E: Unexpected keyword argument "countdwn" for "retry" of "Task"; did you mean "countdown"?  [call-arg]


    @app.task(retires=3)  # E: Unexpected keyword argument "retires" for overloaded function "task" of "Millpond"  [call-overload]  # E: Untyped decorator makes function "typo" untyped  [untyped-decorator]
    def typo(x: int) -> int:
        return x


    @app.task(max_retries="3")  # E: No overload variant of "task" of "Millpond" matches argument type "str"  [call-overload]  # E: Untyped decorator makes function "wrong_value" untyped  [untyped-decorator]
    def wrong_value(x: int) -> int:
        return x


    @app.task(**options)  # E: Untyped decorator makes function "from_a_dict" untyped  [untyped-decorator]
    def from_a_dict(x: int) -> int:
        return x


    @app.task(bind=True)  # E: Argument 1 to "__call__" of "BoundTaskDecorator" has incompatible type "Callable[[], None]"; expected "Callable[[Task[[], Any]], None]"  [arg-type]
    def not_bound() -> None:
        pass


    def mistakes() -> None:
        add.delay("a", [1])  # E: Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"  [arg-type]  # E: Argument 2 to "delay" of "Task" has incompatible type "list[int]"; expected "int"  [arg-type]
        x: str = add(1, 2)  # E: Incompatible types in assignment (expression has type "int", variable has type "str")  [assignment]
        add.delay(1)  # E: Missing positional argument "y" in call to "delay" of "Task"  [call-arg]
        add.apply_async((1, 2), countdonw=3)  # E: Unexpected keyword argument "countdonw" for "apply_async" of "Task"; did you mean "countdown"?  [call-arg]
        add.apply_async((1, 2), queue=3)  # E: Argument "queue" to "apply_async" of "Task" has incompatible type "int"; expected "str | None"  [arg-type]
        y: str = add.delay(1, 2).get()  # E: Incompatible types in assignment (expression has type "int", variable has type "str")  [assignment]
        r: AsyncResult[str] = add.delay(1, 2)  # E: Incompatible types in assignment (expression has type "AsyncResult[int]", variable has type "AsyncResult[str]")  [assignment]
        v: int = add.delay(1, 2).get(propagate=False)  # E: Incompatible types in assignment (expression has type "int | BaseException", variable has type "int")  [assignment]
        b: bytes = fetch("x")  # E: Incompatible types in assignment (expression has type "Coroutine[Any, Any, bytes]", variable has type "bytes")  [assignment]
        s: str = fetch.delay("x").get()  # E: Incompatible types in assignment (expression has type "bytes", variable has type "str")  [assignment]
        charge.delay(1)  # E: Argument 1 to "delay" of "Task" has incompatible type "int"; expected "str"  [arg-type]
''')


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    """One strict mypy run over both samples: {file name: [(line, "message  [code]"), ...]}."""
    samples = {"typed_ok.py": TYPED_OK, "typed_bad.py": TYPED_BAD}
    return strict_mypy(tmp_path_factory.mktemp("typing"), samples, timeout=180)


def test_every_supported_form_type_checks_clean(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    assert mypy_errors.get("typed_ok.py", []) == []


def test_mistakes_are_reported_exactly_where_marked(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    expected = expected_errors(TYPED_BAD)
    assert len(expected) == 19  # the markers themselves are parsed: none silently dropped
    got = mypy_errors.get("typed_bad.py", [])
    missing = "".join(f"\n  {n}: {m}" for n, m in expected if (n, m) not in got)
    unexpected = "".join(f"\n  {n}: {m}" for n, m in got if (n, m) not in expected)
    assert not missing and not unexpected, f"not reported:{missing}\nnot expected:{unexpected}"
    assert got == expected


def test_the_typed_sample_also_runs(tmp_path: Path) -> None:
    """What mypy accepts the runtime accepts: every option is a valid one, `Task[Any, Any]` and
    `Task[[int], int]` evaluate (the sample has no `from __future__ import annotations`)."""
    path = tmp_path / "typed_ok_runtime.py"
    path.write_text(TYPED_OK)
    spec = importlib.util.spec_from_file_location("typed_ok_runtime", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: Millpond = module.app
    assert {n for n in app.tasks if not n.startswith("celery.")} == {
        "typed_ok_runtime.add",
        "typed_ok_runtime.negate",
        "typed_ok_runtime.square",
        "sample.resize",
        "typed_ok_runtime.notify",
        "typed_ok_runtime.ping",
        "typed_ok_runtime.charge",
        "typed_ok_runtime.fib",
        "typed_ok_runtime.fetch",
        "typed_ok_runtime.fetch_bound",
        "sample.double",
        "sample.charge_again",
    }
    assert module.add(2, 3) == 5
    assert app.tasks["typed_ok_runtime.square"].options.queue == "shared"
    assert module.fib(10) == 55  # bound: the task is passed as `self`, and calls itself
    assert app.tasks["sample.charge_again"].options.bind


def test_typed_options_are_the_runtime_options() -> None:
    """The TypedDicts the type checker reads and the sets the runtime checks cannot drift."""
    assert set(TaskDecoratorOptions.__annotations__) | {"bind"} == TASK_OPTIONS
    assert set(SendOptions.__annotations__) == SEND_OPTIONS
    for method in (Millpond.send_task, Task.apply_async):
        assert inspect.signature(method).parameters["options"].annotation == "Unpack[SendOptions]"


def test_unknown_options_still_fail_at_runtime_with_the_valid_ones() -> None:
    """For callers mypy does not see (options from a dict, untyped code), as before."""
    app = Millpond("typing-runtime", broker_url="memory://typing-runtime")
    task_options: dict[str, Any] = {"retires": 3}
    with pytest.raises(TypeError, match=r"unknown task option\(s\) retires .*valid options: acks_"):
        app.task(**task_options)(lambda: None)
    add = app.task(lambda x, y: x + y, name="typing.add")
    send_options: dict[str, Any] = {"countdonw": 3}
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) countdonw .*valid options: .*countdown"
    ):
        add.apply_async((1, 2), **send_options)


def test_every_package_is_type_checked_and_ships_py_typed() -> None:
    """A new plugin must be added to [tool.mypy] files, and each package marks itself typed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    files = set(config["files"])
    plugins = sorted(p.parent / "src" for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    sources = [ROOT / "core" / "src", *plugins]
    assert len(sources) > 1
    for src in sources:
        assert src.relative_to(ROOT).as_posix() in files, f"{src} is not in [tool.mypy] files"
        packages = [p for p in src.iterdir() if (p / "__init__.py").is_file()]
        assert packages, f"no package under {src}"
        for package in packages:
            assert (package / "py.typed").is_file(), f"{package} has no py.typed"


def test_the_type_checkers_exports_are_the_lazy_exports() -> None:
    """`millpond/__init__.py` names each export twice: in `_EXPORTS` (what `__getattr__` imports
    on first use) and under `TYPE_CHECKING` (what mypy sees). A name in one list only would be
    a type error that runs, or a name mypy knows that fails at run time."""
    import ast

    import millpond

    tree = ast.parse(Path(millpond.__file__).read_text())
    guard = next(
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    )
    typed = {
        alias.asname: node.module
        for node in guard.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    assert typed == millpond._EXPORTS
    for name in millpond._EXPORTS:
        assert getattr(millpond, name) is not None
