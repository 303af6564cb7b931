"""Settings: defaults < file < env < flags, typed, validated with messages that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from millpond.exceptions import ConfigurationError
from millpond.settings import CORE, Option, Section, describe, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "millpond.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings(env={})
    assert s.pool == "threads"
    assert s.queues == ("celery",)
    assert s.acks_late is True
    assert s.sources["pool"] == "default"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'pool = "solo"\nconcurrency = 3\nqueues = ["a", "b"]\nprefetch_multiplier = 7\n'
    )
    env = {
        "MILLPOND_SETTINGS_FILE": str(path),
        "MILLPOND_CONCURRENCY": "5",
        "MILLPOND_POOL": "prefork",
    }
    s = load_settings({"pool": "gevent"}, env=env)
    assert s.pool == "gevent" and s.sources["pool"] == "flag"
    assert s.concurrency == 5 and s.sources["concurrency"] == "env MILLPOND_CONCURRENCY"
    assert s.queues == ("a", "b") and s.sources["queues"].startswith("file ")
    assert s.prefetch_multiplier == 7


def test_env_values_are_typed_explicitly() -> None:
    env = {
        "MILLPOND_BROKER_URL": "redis://:1234@localhost/0",
        "MILLPOND_WORKER_NAME": "1234",  # TOML would make this an int: it must stay text
        "MILLPOND_ACKS_LATE": "no",  # TOML leaves "no" a string: it must become False
        "MILLPOND_QUEUES": "high,low",
        "MILLPOND_TIME_LIMIT": "30",
    }
    s = load_settings(env=env)
    assert s.worker_name == "1234"
    assert s.acks_late is False
    assert s.queues == ("high", "low")
    assert s.time_limit == 30.0


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"MILLPOND_CONCURRENCY": "lots"},
            "setting 'concurrency' (env MILLPOND_CONCURRENCY) has a bad value 'lots'",
        ),
        ({"MILLPOND_CONCURRENCY": "0"}, "too small"),
        ({"MILLPOND_LOG_FORMAT": "xml"}, "one of 'auto', 'json', 'console'"),
        ({"MILLPOND_ACKS_LATE": "maybe"}, "not a boolean"),
        ({"MILLPOND_TIME_LIMIT": "10", "MILLPOND_SOFT_TIME_LIMIT": "20"}, "must be shorter"),
    ],
)
def test_bad_values_name_setting_source_and_allowed(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env=env)
    assert needle in str(info.value)


def test_unknown_key_in_file_is_an_error_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "concurency = 4\n")
    with pytest.raises(ConfigurationError, match="did you mean 'concurrency'"):
        load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})


def test_unknown_env_is_a_warning() -> None:
    s = load_settings(env={"MILLPOND_CONCURENCY": "4"})
    assert any("concurency" in w for w in s.warnings)


def test_missing_settings_file_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="not a readable file"):
        load_settings(env={"MILLPOND_SETTINGS_FILE": "/nonexistent/millpond.toml"})


def test_plugin_sections_from_file_and_env(tmp_path: Path) -> None:
    section = Section(
        "prefork",
        "Prefork",
        (Option("max_tasks_per_child", "int", None, "h", nullable=True, minimum=1),),
    )
    path = write(tmp_path, "[prefork]\nmax_tasks_per_child = 10\n")
    s = load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})
    assert s.section(section)["max_tasks_per_child"] == 10
    s = load_settings(
        env={"MILLPOND_SETTINGS_FILE": str(path), "MILLPOND_PREFORK__MAX_TASKS_PER_CHILD": "3"}
    )
    assert s.section(section)["max_tasks_per_child"] == 3
    bad = load_settings(env={"MILLPOND_PREFORK__MAX_TASK_PER_CHILD": "3"})
    with pytest.raises(ConfigurationError, match="did you mean 'max_tasks_per_child'"):
        bad.section(section)


def test_secrets_are_masked_in_describe() -> None:
    s = load_settings(env={"MILLPOND_BROKER_URL": "redis://user:hunter2@localhost:6379/0"})
    rows = {r[0]: r for r in describe(s)}
    assert "hunter2" not in rows["broker_url"][2]
    assert rows["broker_url"][2] == "redis://user:***@localhost:6379/0"
    assert rows["broker_url"][3] == "env MILLPOND_BROKER_URL"


def test_every_core_option_is_a_settings_field() -> None:
    from millpond.settings import Settings

    fields = set(Settings.__dataclass_fields__)
    assert {o.name for o in CORE.options} <= fields
