"""One source of truth for settings: validation, `millpond config` and docs/settings.md all come
from the declarations (CORE and each plugin's Section)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from millpond.config.options import Option, Section
from millpond.config.settings import load_settings
from millpond.exceptions import ConfigurationError
from millpond_cli.settings_docs import (
    REGENERATE,
    describe,
    env_name,
    installed_sections,
    main,
    render,
)
from tests.install.venvs import ROOT, clean_env

DOCS = ROOT / "docs" / "settings.md"


# -- the generated reference ----------------------------------------------------------------------
def test_docs_settings_md_is_up_to_date() -> None:
    current = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else ""
    assert current == render(), (
        f"docs/settings.md is out of date with the settings declarations: run `{REGENERATE}`"
    )


def test_each_section_is_listed_once_under_its_own_name_with_its_distribution() -> None:
    listed = [(doc.section.name, doc.distribution) for doc in installed_sections()]
    assert listed[0] == (None, "millpond")  # the core's first
    names = [name for name, _dist in listed]
    assert len(names) == len(set(names))  # a broker's is published once per URL scheme
    assert dict(listed)["redis"] == "millpond-broker-redis"
    assert dict(listed)["sqlite"] == "millpond-broker-embedded"


def test_docs_describe_every_declared_setting() -> None:
    text = render()
    for section in (doc.section for doc in installed_sections()):
        for opt in section.options:
            assert f"`{env_name(section.key(opt.name))}`" in text, opt.name
        if section.name:
            assert f"(`[{section.name}]`)" in text


def test_check_mode_fails_on_a_stale_file_and_passes_on_a_fresh_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "settings.md"
    stale.write_text("# Settings reference\n\nedited by hand\n")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0


def test_docs_show_flags_defaults_and_secrets() -> None:
    text = render()
    row = next(line for line in text.splitlines() if line.startswith("| `concurrency`"))
    assert "`-c`, `--concurrency`" in row
    assert "`MILLPOND_CONCURRENCY`" in row
    queues = next(line for line in text.splitlines() if line.startswith("| `queues`"))
    assert '`["celery"]`' in queues
    broker = next(line for line in text.splitlines() if line.startswith("| `broker_url`"))
    assert "Secret: masked" in broker


@pytest.mark.e2e
def test_millpond_config_docs_prints_the_reference(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "millpond", "config", "--docs"],
        cwd=tmp_path,
        env=clean_env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render()


# -- values TOML would mistype ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "typed",
    ["0x1F", "1e3", "0123", "1_000", "1979-05-27", "true", "inf", '"quoted"', "@json {}", "[a, b]"],
)
def test_text_settings_from_the_environment_stay_exactly_as_typed(typed: str) -> None:
    s = load_settings(env={"MILLPOND_WORKER_NAME": typed, "MILLPOND_SIGNING_KEY": typed})
    assert s.worker_name == typed
    assert s.signing_key == typed


VAULT = Section(
    "vault",
    "Test section",
    (
        Option("token", "str", None, "A secret.", secret=True, nullable=True),
        Option("retries", "int", 3, "A number.", minimum=0),
        Option("verify", "bool", True, "A flag."),
    ),
)


def test_plugin_section_text_from_the_environment_stays_as_typed() -> None:
    s = load_settings(
        env={
            "MILLPOND_VAULT__TOKEN": "1e3",
            "MILLPOND_VAULT__RETRIES": "7",
            "MILLPOND_VAULT__VERIFY": "no",
        },
        sections=[VAULT],
    )
    assert dict(s.section(VAULT)) == {"token": "1e3", "retries": 7, "verify": False}
    rows = {r[0]: r for r in describe(s, [VAULT])}
    assert rows["vault.token"][2] == "***"
    assert rows["vault.token"][3] == "env MILLPOND_VAULT__TOKEN"


@pytest.mark.parametrize(
    ("typed", "expected"), [("yes", True), ("no", False), ("on", True), ("OFF", False), ("1", True)]
)
def test_booleans_accept_the_usual_words(typed: str, expected: bool) -> None:
    assert load_settings(env={"MILLPOND_ACKS_LATE": typed}).acks_late is expected


def test_numbers_and_lists_still_come_typed_from_the_environment() -> None:
    s = load_settings(
        env={
            "MILLPOND_CONCURRENCY": "8",
            "MILLPOND_SHUTDOWN_TIMEOUT": "2.5",
            "MILLPOND_QUEUES": '["high", "low"]',
        }
    )
    assert (s.concurrency, s.shutdown_timeout, s.queues) == (8, 2.5, ("high", "low"))


def test_a_mistyped_number_names_the_variable() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"'vault\.retries' \(env MILLPOND_VAULT__RETRIES\) has a bad value 'many'",
    ):
        load_settings(
            env={"MILLPOND_VAULT__RETRIES": "many", "MILLPOND_VAULT__TOKEN": "x"},
            sections=[VAULT],
        )


# -- millpond config, end to end ----------------------------------------------------------------
def parse_config(stdout: str) -> dict[str, tuple[str, str]]:
    """name -> (value, source) from `millpond config`'s table."""
    rows: dict[str, tuple[str, str]] = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        rest = rest.rsplit(" ", 1)[0].strip()  # drop the environment variable column
        found = re.search(r"(default|flag|code|file \S+|env \S+)( \(query\))?$", rest)
        assert found, line
        rows[name] = (rest[: found.start()].strip(), found.group(0))
    return rows


@pytest.mark.e2e
def test_millpond_config_shows_values_sources_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "millpond.toml").write_text(
        'concurrency = 3\nqueues = ["high", "low"]\n\n[asyncio]\nsync_tasks = "refuse"\n'
    )
    env = clean_env(
        {
            "PYTHONPATH": str(ROOT),
            "MILLPOND_RESULT_BACKEND": "redis://:0123@127.0.0.1:6379/1",
            "MILLPOND_WORKER_NAME": "0x1F",
            "MILLPOND_ACKS_LATE": "no",
            "MILLPOND_ASYNCIO__EXECUTOR_THREADS": "4",
            "MILLPOND_SIGNING_KEY": "hunter2hunter2",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "millpond", "config", "-b", "redis://user:s3cret@127.0.0.1:6379/0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for secret in ("s3cret", "0123", "hunter2hunter2"):
        assert secret not in proc.stdout
    rows = parse_config(proc.stdout)
    assert rows["broker_url"] == ("redis://user:***@127.0.0.1:6379/0", "flag")
    assert rows["result_backend"] == (
        "redis://:***@127.0.0.1:6379/1",
        "env MILLPOND_RESULT_BACKEND",
    )
    assert rows["signing_key"][1] == "env MILLPOND_SIGNING_KEY"
    assert rows["concurrency"] == ("3", "file millpond.toml")
    assert rows["queues"] == ("high,low", "file millpond.toml")
    assert rows["worker_name"] == ("0x1F", "env MILLPOND_WORKER_NAME")
    assert rows["acks_late"] == ("False", "env MILLPOND_ACKS_LATE")
    assert rows["pool"] == ("threads", "default")
    assert rows["asyncio.sync_tasks"] == ("refuse", "file millpond.toml")
    assert rows["asyncio.executor_threads"] == ("4", "env MILLPOND_ASYNCIO__EXECUTOR_THREADS")


@pytest.mark.e2e
def test_millpond_config_rejects_a_bad_value_with_exit_2(tmp_path: Path) -> None:
    env = clean_env({"PYTHONPATH": str(ROOT), "MILLPOND_CONCURRENCY": "lots"})
    proc = subprocess.run(
        [sys.executable, "-m", "millpond", "config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "setting 'concurrency' (env MILLPOND_CONCURRENCY) has a bad value 'lots'" in proc.stderr
