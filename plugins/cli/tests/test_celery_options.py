"""Celery's `celery worker` options as `millpond worker` reads them: the settings each one gives
(the worker's behaviour with them is tested in tests/e2e/test_cli.py)."""

from __future__ import annotations

import socket

import pytest

from millpond_cli.celery_compat import expand_hostname, hoist_global_options
from millpond_cli.main import worker_flags
from millpond_cli.parser import build_parser


def flags(*args: str) -> dict[str, object]:
    return worker_flags(build_parser().parse_args(["worker", *args]))


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["-l", "fatal"], {"log_level": "CRITICAL"}),
        (["--loglevel=info"], {"log_level": "INFO"}),
        (["-O", "fair"], {"prefork.prefetch_per_child": 1}),
        (["-O", "default"], {}),
        (["--max-tasks-per-child", "100"], {"prefork.max_tasks_per_child": 100}),
        (["--max-memory-per-child", "204800"], {"prefork.max_memory_per_child": 200}),
        (["--max-memory-per-child", "1025"], {"prefork.max_memory_per_child": 2}),  # rounded up
        (["--without-mingle"], {"control.mingle": False}),
        (["--without-gossip"], {}),
        (["--heartbeat-interval", "10"], {"events.heartbeat_interval": 10.0}),
        (["--events"], {"events.tasks": True}),
        (["-P", "processes"], {"pool": "prefork"}),
        (["--hostname", "w1"], {"worker_name": "celery@w1"}),
        (["-n", "w1@%h"], {"worker_name": f"w1@{socket.gethostname()}"}),
    ],
)
def test_celery_worker_options_map_to_settings(args: list[str], wanted: dict[str, object]) -> None:
    assert flags(*args) == wanted


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["-c", "auto"], "leave -c out for the pool's default"),
        (["--prefetch-multiplier", "0"], "Celery's 0 (no prefetch limit) is not taken"),
    ],
)
def test_celery_values_millpond_does_not_take_are_refused_with_what_to_use(
    args: list[str], wanted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        flags(*args)
    assert exited.value.code == 2
    assert wanted in capsys.readouterr().err


def test_hostname_placeholders_are_celerys() -> None:
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    assert expand_hostname("w1@%h", flag=True) == f"w1@{host}"
    assert expand_hostname("%n-%d@x 100%%", flag=True) == f"{short}-{domain}@x 100%"
    assert expand_hostname("plain", flag=False) == "plain"  # MILLPOND_WORKER_NAME: no celery@


def test_global_options_before_the_command_move_after_it() -> None:
    commands = {"worker", "send"}
    assert hoist_global_options(["-A", "proj", "-b=redis://h", "worker", "-c", "2"], commands) == [
        "worker", "-A", "proj", "-b=redis://h", "-c", "2",
    ]  # fmt: skip
    assert hoist_global_options(["-Aproj", "send", "t"], commands) == ["send", "-Aproj", "t"]
    assert hoist_global_options(["--version"], commands) == ["--version"]
    assert hoist_global_options(["worker", "-A", "p"], commands) == ["worker", "-A", "p"]
