"""Settings: defaults < file < code < env < flags, for the core and for plugin sections, typed and
validated with messages that name the setting, where it came from and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from millpond.config.options import Option, Section, declared, setting
from millpond.config.settings import CORE, Settings, load_settings
from millpond.exceptions import ConfigurationError
from millpond_broker_amqp.settings import parse as parse_amqp
from millpond_broker_embedded.sqlite import SETTINGS as SQLITE
from millpond_broker_embedded.sqlite import parse_url
from millpond_broker_redis.config import parse as parse_redis
from millpond_cli.settings_docs import describe
from millpond_pool_prefork.settings import SECTION as PREFORK


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "millpond.toml"
    path.write_text(text)
    return path


@dataclass(frozen=True)
class _Declared:
    retries: int = setting(3, "A number.", minimum=0)
    token: str | None = setting(None, "A secret.", secret=True)
    hosts: tuple[str, ...] = setting(("a", "b"), "A list.")
    extra: Mapping[str, Any] = setting({}, "A table.")
    not_a_setting: int = 0


def test_a_dataclass_field_is_the_declaration() -> None:
    retries, token, hosts, extra = declared(_Declared)
    assert retries == Option("retries", "int", 3, "A number.", minimum=0)
    assert token == Option("token", "str", None, "A secret.", nullable=True, secret=True)
    assert (hosts.kind, hosts.default, extra.kind, extra.default) == (
        "list",
        ("a", "b"),
        "table",
        {},
    )
    assert _Declared().extra == {} and _Declared().extra is not _Declared().extra
    # the core's Settings fields are CORE: one declaration, in one order
    assert [o.name for o in CORE.options] == [f.name for f in fields(Settings)][:-3]
    assert all(getattr(Settings(), o.name) == o.default for o in CORE.options)


def test_a_field_of_an_undeclarable_type_is_refused() -> None:
    @dataclass(frozen=True)
    class Odd:
        where: complex = setting(1j, "A number that is not a setting's.")

    with pytest.raises(TypeError, match=r"Odd\.where is a <class 'complex'>: declare a str"):
        declared(Odd)


def test_defaults() -> None:
    s = load_settings(env={})
    assert s.pool == "threads"
    assert s.queues == ("celery",)
    assert s.acks_late is True
    assert s.sources["pool"] == "default"
    assert s.warnings == ()


def test_precedence_flags_env_code_file_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'pool = "solo"\nconcurrency = 3\nqueues = ["a", "b"]\nprefetch_multiplier = 7\n'
        'default_queue = "from-file"\n',
    )
    env = {
        "MILLPOND_SETTINGS_FILE": str(path),
        "MILLPOND_CONCURRENCY": "5",
        "MILLPOND_POOL": "prefork",
    }
    code = {"pool": "asyncio", "concurrency": 4, "default_queue": "from-code", "max_deliveries": 9}
    s = load_settings({"pool": "gevent"}, env=env, code=code)
    assert (s.pool, s.sources["pool"]) == ("gevent", "flag")
    assert (s.concurrency, s.sources["concurrency"]) == (5, "env MILLPOND_CONCURRENCY")
    assert (s.default_queue, s.sources["default_queue"]) == ("from-code", "code")
    assert (s.max_deliveries, s.sources["max_deliveries"]) == (9, "code")
    assert s.queues == ("a", "b") and s.sources["queues"] == f"file {path}"
    assert (s.prefetch_multiplier, s.sources["shutdown_timeout"]) == (7, "default")


def test_precedence_holds_for_plugin_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[prefork]\nmax_tasks_per_child = 10\nkill_grace = 2.0\nstart_timeout = 5\n"
    )
    env = {"MILLPOND_SETTINGS_FILE": str(path)}
    s = load_settings(env=env)
    assert dict(s.section(PREFORK)) == {
        "max_tasks_per_child": 10,
        "max_memory_per_child": None,
        "kill_grace": 2.0,
        "start_timeout": 5.0,
        "prefetch_per_child": 4,
        "reserve_per_child": 4,
    }
    code = {"prefork": {"max_tasks_per_child": 20, "kill_grace": 3}}
    s = load_settings(env={**env, "MILLPOND_PREFORK__MAX_TASKS_PER_CHILD": "30"}, code=code)
    values = s.section(PREFORK)
    assert values["max_tasks_per_child"] == 30  # env beats code
    assert values["kill_grace"] == 3.0  # code beats the file
    assert values["start_timeout"] == 5.0  # the file's, merged with the others' keys
    assert s.sources["prefork.max_tasks_per_child"] == "env MILLPOND_PREFORK__MAX_TASKS_PER_CHILD"
    assert s.sources["prefork.kill_grace"] == "code"
    assert s.sources["prefork.start_timeout"] == f"file {path}"
    assert s.plugin_options("prefork") == dict(values)  # what the worker hands the pool


def test_code_added_after_the_rest_keeps_its_rank(tmp_path: Path) -> None:
    """The command line reads file, environment and flags first (they name the app) and reads
    them again with the app's code settings once it is imported: code still ranks between them."""
    path = write(tmp_path, "concurrency = 3\nprefetch_multiplier = 7\n[prefork]\nkill_grace = 2\n")
    env = {"MILLPOND_SETTINGS_FILE": str(path), "MILLPOND_CONCURRENCY": "5"}
    flags = {"pool": "solo"}
    code = {
        "pool": "threads",
        "concurrency": 4,
        "prefetch_multiplier": 9,
        "default_queue": "q",
        "prefork": {"kill_grace": 3},
    }
    first = load_settings(flags, env=env)
    assert (first.prefetch_multiplier, first.default_queue) == (7, "celery")
    late = load_settings(flags, env=env, code=code)
    assert (late.pool, late.concurrency, late.prefetch_multiplier) == ("solo", 5, 9)
    assert late.section(PREFORK)["kill_grace"] == 3.0
    assert late.sources["prefork.kill_grace"] == "code"


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


def test_a_deeper_env_key_sets_one_key_of_a_table(tmp_path: Path) -> None:
    """`__` nests as in dynaconf: the variable adds a key to the table the file gives."""
    path = write(tmp_path, "[kombu]\ntransport_options = {a = 1}\n")
    env = {"MILLPOND_SETTINGS_FILE": str(path), "MILLPOND_KOMBU__TRANSPORT_OPTIONS__B": "2"}
    s = load_settings(env=env)
    assert s.sections["kombu"]["transport_options"] == {"a": 1, "b": 2}
    assert s.sources["kombu.transport_options"] == "env MILLPOND_KOMBU__TRANSPORT_OPTIONS__B"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"MILLPOND_CONCURRENCY": "lots"},
            "setting 'concurrency' (env MILLPOND_CONCURRENCY) has a bad value 'lots'",
        ),
        ({"MILLPOND_CONCURRENCY": "0"}, "bad value '0': too small"),
        ({"MILLPOND_LOG_FORMAT": "xml"}, "one of 'auto', 'json', 'console'"),
        ({"MILLPOND_ACKS_LATE": "maybe"}, "not a boolean"),
        ({"MILLPOND_SHUTDOWN_TIMEOUT": "inf"}, "not a finite number"),
        ({"MILLPOND_QUEUES": "[a, b]"}, "not a TOML array"),
        ({"MILLPOND_TIME_LIMIT": "10", "MILLPOND_SOFT_TIME_LIMIT": "20"}, "must be shorter"),
        ({"MILLPOND_QUEUES": ""}, "setting 'queues' (env MILLPOND_QUEUES) is empty"),
    ],
)
def test_bad_values_name_setting_source_and_allowed(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env=env)
    assert needle in str(info.value)


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(
            env={
                "MILLPOND_CONCURRENCY": "lots",
                "MILLPOND_ACKS_LATE": "maybe",
                "MILLPOND_PREFORK__KILL_GRACE": "soon",
            }
        )
    text = str(info.value)
    assert text.startswith("3 settings are invalid:")
    assert "'concurrency'" in text and "'acks_late'" in text and "'prefork.kill_grace'" in text


def test_unknown_key_in_file_is_an_error_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "concurency = 4\n")
    with pytest.raises(ConfigurationError, match="did you mean 'concurrency'"):
        load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})


def test_unknown_key_in_code_is_an_error_with_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"'brokr_url' \(code\).*'broker_url'"):
        load_settings(env={}, code={"brokr_url": "redis://h"})


def test_unknown_env_is_a_warning_with_suggestion() -> None:
    s = load_settings(env={"MILLPOND_CONCURENCY": "4"})
    assert any("concurency" in w and "did you mean 'concurrency'" in w for w in s.warnings)


@pytest.mark.parametrize("source", ["file", "env", "code"])
def test_unknown_key_in_a_plugin_section_is_an_error_with_suggestion(
    source: str, tmp_path: Path
) -> None:
    env: dict[str, str] = {}
    code: dict[str, Any] = {}
    if source == "file":
        env["MILLPOND_SETTINGS_FILE"] = str(write(tmp_path, "[redis]\nlease_timout = 3\n"))
    elif source == "env":
        env["MILLPOND_REDIS__LEASE_TIMOUT"] = "3"
    else:
        code["redis"] = {"lease_timout": 3}
    with pytest.raises(ConfigurationError) as info:
        load_settings(env=env, code=code)
    text = str(info.value)
    assert "unknown setting 'redis.lease_timout'" in text
    assert "did you mean 'lease_timeout'" in text
    assert "the [redis] section has: heartbeat_interval, lease_timeout" in text


def test_kombu_names_in_a_section_get_a_pointed_hint() -> None:
    with pytest.raises(ConfigurationError, match=r"is not supported: .*lease_timeout"):
        load_settings(env={"MILLPOND_REDIS__VISIBILITY_TIMEOUT": "3600"})


def test_a_section_no_plugin_reads_is_a_warning_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[redsi]\nlease_timeout = 3\n")
    s = load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})
    (warning,) = s.warnings
    assert "no installed plugin reads a [redsi] section" in warning
    assert "did you mean 'redis'" in warning


def test_a_broker_scheme_is_not_a_section_name() -> None:
    with pytest.raises(ConfigurationError, match=r"the rediss plugin reads \[redis\]"):
        load_settings(env={"MILLPOND_REDISS__LEASE_TIMEOUT": "3"})


def test_missing_settings_file_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="not a readable file"):
        load_settings(env={"MILLPOND_SETTINGS_FILE": "/nonexistent/millpond.toml"})


def test_a_malformed_file_says_which(tmp_path: Path) -> None:
    path = write(tmp_path, "concurrency = \n")
    with pytest.raises(ConfigurationError, match=f"cannot read settings file {path}"):
        load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})


# -- one boolean vocabulary, everywhere ------------------------------------------------------------
WORDS = [
    ("true", True),
    ("false", False),
    ("yes", True),
    ("no", False),
    ("on", True),
    ("OFF", False),
    ("1", True),
    ("0", False),
]
NOT_WORDS = ["y", "t", "maybe", "2", "enabled"]


@pytest.mark.parametrize(("word", "expected"), WORDS)
def test_one_boolean_vocabulary_for_every_source(word: str, expected: bool, tmp_path: Path) -> None:
    # the core, from the environment, the file (a TOML string), code and a flag
    assert load_settings(env={"MILLPOND_ACKS_LATE": word}).acks_late is expected
    path = write(tmp_path, f'acks_late = "{word}"\n[redis]\nssl_check_hostname = "{word}"\n')
    from_file = load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})
    assert from_file.acks_late is expected
    assert load_settings(env={}, code={"acks_late": word}).acks_late is expected
    assert load_settings({"acks_late": word}, env={}).acks_late is expected
    # a plugin section, from the file and the environment
    assert from_file.plugin_options("redis")["ssl_check_hostname"] is expected
    env = {"MILLPOND_REDIS__SSL_CHECK_HOSTNAME": word}
    assert load_settings(env=env).plugin_options("redis")["ssl_check_hostname"] is expected
    # URL query parameters, through each broker's own parser
    assert parse_redis(f"rediss://h/0?ssl_check_hostname={word}").ssl_check_hostname is expected
    assert parse_amqp(f"amqp://h//?confirm_publish={word}").confirm_publish is expected


@pytest.mark.parametrize("word", NOT_WORDS)
def test_anything_else_is_not_a_boolean_anywhere(word: str) -> None:
    with pytest.raises(ConfigurationError, match="not a boolean"):
        load_settings(env={"MILLPOND_ACKS_LATE": word})
    with pytest.raises(ConfigurationError, match="not a boolean"):
        load_settings(env={"MILLPOND_REDIS__SSL_CHECK_HOSTNAME": word})
    with pytest.raises(ConfigurationError, match=r"'redis\.ssl_check_hostname' \(in the query"):
        parse_redis(f"rediss://h/0?ssl_check_hostname={word}")
    with pytest.raises(ConfigurationError, match=r"'amqp\.confirm_publish' \(in the query"):
        parse_amqp(f"amqp://h//?confirm_publish={word}")


# -- URL query parameters against settings ---------------------------------------------------------
def test_a_url_query_counts_as_given_where_the_url_was_given(tmp_path: Path) -> None:
    path = write(tmp_path, "[sqlite]\nlease_timeout = 30\nbusy_timeout = 9\n")
    db = tmp_path / "broker.db"
    env = {
        "MILLPOND_SETTINGS_FILE": str(path),
        "MILLPOND_BROKER_URL": f"sqlite://{db}?lease_timeout=3&heartbeat_interval=0.5",
    }
    s = load_settings(env=env)
    options = s.plugin_options("sqlite", "broker_url")
    assert options["lease_timeout"] == 3.0  # the env's URL beats the file's section
    assert options["busy_timeout"] == 9.0  # the file's, untouched by the URL
    assert parse_url(s.broker_url or "", options)[1].lease_timeout == 3.0  # what the broker gets
    rows = {r[0]: r for r in describe(s, [SQLITE])}
    assert rows["sqlite.lease_timeout"][2:] == ("3.0", "env MILLPOND_BROKER_URL (query)")
    assert rows["sqlite.busy_timeout"][2:] == ("9.0", f"file {path}")

    # the other way round: the environment's section beats the file's URL
    path.write_text(f'broker_url = "sqlite://{db}?lease_timeout=3"\n')
    s = load_settings(
        env={"MILLPOND_SETTINGS_FILE": str(path), "MILLPOND_SQLITE__LEASE_TIMEOUT": "7"}
    )
    assert s.plugin_options("sqlite", "broker_url")["lease_timeout"] == 7.0

    # from the same place, the URL (more specific) wins
    path.write_text(f'broker_url = "sqlite://{db}?lease_timeout=3"\n[sqlite]\nlease_timeout = 7\n')
    s = load_settings(env={"MILLPOND_SETTINGS_FILE": str(path)})
    assert s.plugin_options("sqlite", "broker_url")["lease_timeout"] == 3.0


def test_a_plugin_without_a_section_gets_nothing() -> None:
    s = load_settings(env={})
    assert s.plugin_options("solo") == {}
    assert s.plugin_options("memory", "broker_url") == {}


# -- secrets -----------------------------------------------------------------------------------
def test_secrets_are_masked_in_describe() -> None:
    s = load_settings(
        env={
            "MILLPOND_BROKER_URL": "redis://user:hunter2@localhost:6379/0",
            "MILLPOND_SIGNING_KEY": "s3cr3t-key",
            "MILLPOND_REDIS__SENTINEL_PASSWORD": "sentinel-pw",
        }
    )
    from millpond_broker_redis.settings import SECTION as REDIS

    rows = {r[0]: r for r in describe(s, [REDIS])}
    assert rows["broker_url"][2] == "redis://user:***@localhost:6379/0"
    assert rows["broker_url"][3] == "env MILLPOND_BROKER_URL"
    assert rows["signing_key"][2] == "***"
    assert rows["redis.sentinel_password"][2:] == ("***", "env MILLPOND_REDIS__SENTINEL_PASSWORD")
    text = repr(rows)
    assert "hunter2" not in text and "s3cr3t" not in text and "sentinel-pw" not in text


def test_secrets_are_masked_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_redis("redis://h/0?sentinel_password=hunter2&lease_timeout=soon")
    assert "hunter2" not in str(info.value)
    secret = Section(
        "vault", "Vault", (Option("token", "int", 0, "A numeric secret.", secret=True),)
    )
    with pytest.raises(ConfigurationError) as info:
        load_settings(env={"MILLPOND_VAULT__TOKEN": "hunter2"}, sections=[secret])
    assert "hunter2" not in str(info.value)
    assert "'vault.token' (env MILLPOND_VAULT__TOKEN) has a bad value ***" in str(info.value)


# -- the frozen object ---------------------------------------------------------------------------
def test_every_core_option_is_a_settings_field() -> None:
    from millpond.config.settings import Settings

    fields = set(Settings.__dataclass_fields__)
    assert {o.name for o in CORE.options} <= fields


def test_declared_defaults_pass_their_own_validation() -> None:
    from millpond_cli.settings_docs import installed_sections

    for section in (doc.section for doc in installed_sections()):
        for opt in section.options:
            assert opt.cast(opt.default) == opt.default, f"{section.key(opt.name)}"


def test_replace_checks_each_change() -> None:
    s = load_settings(env={})
    changed = s.replace(concurrency="3")
    assert (changed.concurrency, changed.sources["concurrency"]) == (3, "flag")
    with pytest.raises(ConfigurationError, match="'concurrency' \\(flag\\) has a bad value 0"):
        s.replace(concurrency=0)
    with pytest.raises(ConfigurationError, match="did you mean 'concurrency'"):
        s.replace(concurency=3)
    with pytest.raises(ConfigurationError, match=r"soft_time_limit \(20s, flag\) must be shorter"):
        s.replace(time_limit=10, soft_time_limit=20)  # the rules across settings hold here too


def test_accept_content_names_only_what_millpond_decodes() -> None:
    with pytest.raises(ConfigurationError, match="'application/x-yaml' is not allowed"):
        load_settings(env={"MILLPOND_ACCEPT_CONTENT": "application/json,application/x-yaml"})
    both = load_settings(
        env={"MILLPOND_ACCEPT_CONTENT": "application/json,application/x-python-serialize"}
    )
    assert both.accept_content == ("application/json", "application/x-python-serialize")


def test_a_failover_list_is_masked_and_read_member_by_member() -> None:
    """`amqp://u:pw@n1//;amqp://u:pw@n2//?heartbeat=5`: every member's password is masked, and
    the query of any member is read (not the text after the first '?', which runs into the next
    member)."""
    from millpond.contracts.broker import mask_url

    url = "amqp://u:hunter2@n1:5672//?heartbeat=5;amqp://u:hunter2@n2:5672//;sentinel://:pw3@h/0"
    masked = mask_url(url)
    assert "hunter2" not in masked and "pw3" not in masked and masked.count("***") == 3
    section = Section(
        "fo", "Failover", (Option("heartbeat", "float", 60.0, "."), Option("a", "int", 0, "."))
    )
    assert section.query("amqp://n1//?heartbeat=5;amqp://n2//?a=2") == {"heartbeat": 5.0, "a": 2}
    settings = load_settings(
        env={"MILLPOND_BROKER_URL": "amqp://guest:guest@n1//;amqp://guest:guest@n2//?heartbeat=7"}
    )
    assert (
        parse_amqp(settings.broker_url, settings.plugin_options("amqp", "broker_url")).heartbeat
        == 7.0
    )


def test_a_table_left_unset_is_a_copy_of_its_default_not_the_declaration_itself() -> None:
    declared_default = {"region": "eu"}
    section = Section(
        "tbl",
        "Tables",
        (Option("options", "table", declared_default, "."), Option("n", "int", 0, ".")),
    )
    first = load_settings(env={"MILLPOND_TBL__N": "1"}, sections=[section])
    assert first.sections["tbl"]["options"] == {"region": "eu"}
    assert first.sections["tbl"]["options"] is not declared_default
    first.sections["tbl"]["options"]["region"] = "us"  # a plugin changing its own copy
    assert declared_default == {"region": "eu"}
    again = load_settings(env={"MILLPOND_TBL__N": "2"}, sections=[section])
    assert again.sections["tbl"]["options"] == {"region": "eu"}


def test_celerys_timezone_setting_points_to_beats() -> None:
    for source in ({"code": {"timezone": "Europe/Berlin"}}, {"env": {"MILLPOND_TIMEZONE": "UTC"}}):
        with pytest.raises(
            ConfigurationError, match=r"use beat\.timezone .*MILLPOND_BEAT__TIMEZONE"
        ):
            load_settings(env=source.get("env", {}), code=source.get("code"))
