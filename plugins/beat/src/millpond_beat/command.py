"""`millpond beat`: run the scheduler (or `--list` its entries), and `millpond worker -B`.

Start-up builds and checks every entry before anything runs: a bad crontab, an unknown task or
time zone exits with status 2 and names the entry. The schedule is then re-read whenever the
settings file changes (every `beat.reload_interval` seconds), without a restart; a change that does
not check out is logged and the running schedule is kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from millpond.contracts.hooks import Hooks, WorkerView
from millpond.exceptions import ConfigurationError, NotSupported
from millpond_beat import entries as entries_mod
from millpond_beat.entries import Entry
from millpond_beat.scheduler import LEADER_FIELD, Beat, BeatConfig
from millpond_beat.schedules import every
from millpond_beat.settings import SECTION
from millpond_beat.sources import ScheduleSource, load_source
from millpond_cli.command import Command

if TYPE_CHECKING:
    from millpond.config.settings import Settings
    from millpond.produce.app import Millpond


def beat_values(settings: Settings) -> Mapping[str, Any]:
    return settings.section(SECTION)


def build_entries(
    app: Millpond, settings: Settings, source: ScheduleSource | None = None
) -> dict[str, Entry]:
    values = beat_values(settings)
    return entries_mod.build(
        app,
        values["schedule"],
        timezone=values["timezone"],
        catch_up=values["catch_up"],
        check_tasks=values["check_tasks"],
        extra=source.schedule() if source is not None else None,
        extra_label=source.label if source is not None else "source",
    )


class SettingsWatch:
    """Re-reads the settings when the settings file changed since the last look (cheap: a stat),
    or when the schedule source's version changed (one cheap query)."""

    def __init__(
        self, app: Millpond, flags: Mapping[str, Any], source: ScheduleSource | None = None
    ) -> None:
        from millpond.config.settings import settings_file

        self.app = app
        self.flags = dict(flags)
        self.source = source
        self.path: Path | None = settings_file(os.environ)
        self.seen = self._stamp()
        self.version = self._version(None)

    def _version(self, previous: Any) -> Any:
        import structlog

        log = structlog.get_logger("millpond.beat")
        """The source's version, or `previous` when it cannot be read now (a database that is
        down keeps the running schedule; the next interval asks again)."""
        if self.source is None:
            return None
        try:
            return self.source.version()
        except Exception as exc:
            log.warning("beat cannot read its schedule source", error=str(exc))
            return previous

    def _stamp(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def __call__(self) -> dict[str, Entry] | None:
        stamp = self._stamp()
        version = self._version(self.version)
        if stamp == self.seen and version == self.version:
            return None
        from millpond.config.settings import load_settings

        try:
            settings = load_settings(self.flags, code=self.app.code_config)
            found = build_entries(self.app, settings, self.source)
        except ConfigurationError:  # a bad edit: said (by Beat) once, read again when it changes
            self.seen, self.version = stamp, version
            raise
        except Exception as exc:  # the source failed mid-read: keep the schedule, look again
            import structlog

            structlog.get_logger("millpond.beat").warning(
                "beat cannot read its schedule source; keeping the running schedule and "
                "reading it again in beat.reload_interval",
                error=str(exc),
            )
            return None
        self.seen, self.version = stamp, version
        return found


def make_beat(
    app: Millpond, settings: Settings, flags: Mapping[str, Any] | None = None, **kwargs: Any
) -> Beat:
    """A scheduler for this app, its entries checked, its claims on the app's broker, and its
    schedule source (setting `beat.source`) loaded and read."""
    name = str(beat_values(settings)["source"] or "").strip()
    source = load_source(name, app) if name else None
    found = build_entries(app, settings, source)
    config = BeatConfig.from_section(beat_values(settings))
    try:
        claims = app.broker.claims()
    except NotSupported as exc:
        raise ConfigurationError(str(exc)) from None
    reload = SettingsWatch(app, flags or {}, source) if config.reload_interval else None
    published = source.published if source is not None else None
    return Beat(app, found, claims, config, reload=reload, published=published, **kwargs)


class BeatCommand(Command):
    help: ClassVar[str] = "run the periodic task scheduler (highly available: run it on N replicas)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--list",
            action="store_true",
            help="print every entry, its next run (local and UTC) and the leading replica",
        )
        parser.add_argument(
            "-l", "--loglevel", dest="log_level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR"
        )
        parser.add_argument("--log-format", choices=("auto", "json", "console"))

    def run(self, ns: argparse.Namespace) -> int:
        from millpond_cli import logs
        from millpond_cli.main import load_from_args

        settings, app = load_from_args(ns)
        if app is None:
            raise ConfigurationError(
                "millpond beat needs the app: pass -A module:attribute (or set MILLPOND_APP)"
            )
        if ns.log_level or ns.log_format:
            settings = settings.replace(
                **{
                    k: v
                    for k, v in (("log_level", ns.log_level), ("log_format", ns.log_format))
                    if v
                }
            )
        flags = {
            k: getattr(ns, k)
            for k in ("app", "broker_url", "result_backend")
            if getattr(ns, k, None)
        }
        beat = make_beat(app, settings, flags)
        if ns.list:
            print_list(beat, sys.stdout)
            return 0
        logs.configure(settings.log_level, settings.log_format, stdlib=settings.log_stdlib)
        meters = start_metrics()
        app.hooks.process_starting("millpond-beat")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: beat.stop())
        try:
            beat.run()
        finally:
            app.hooks.process_exiting()  # the last publish spans out
            if meters is not None:  # the last counts out before the process ends
                meters.force_flush(5000)
                meters.shutdown()
            app.close()
        return 0

    def embed(self, app: Millpond, settings: Settings) -> Callable[[], None]:
        beat = make_beat(app, settings, {"app": settings.app} if settings.app else {})
        embedded = EmbeddedBeat(beat)
        app.add_hooks(embedded)
        return embedded.stop


class EmbeddedBeat(Hooks):
    """`millpond worker -B`: the scheduler on a thread of the worker, started once the worker is
    ready (after a prefork pool has forked: no child inherits the thread or its connections) and
    stopped, handing the lead over, when the worker stops."""

    def __init__(self, beat: Beat) -> None:
        self.beat = beat
        self.thread: threading.Thread | None = None

    def worker_ready(self, worker: WorkerView) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.beat.run, name="millpond-beat", daemon=True)
            self.thread.start()

    def worker_stopped(self, worker: WorkerView) -> None:
        self.stop()

    def stop(self) -> None:
        self.beat.stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=max(5.0, self.beat.config.lease_timeout))


def start_metrics() -> Any:
    """The tick counters' meter provider for a standalone `millpond beat`, made by millpond-metrics
    from the standard OTEL_METRICS_EXPORTER variables (otlp, console); None when none is asked
    for. In a worker (`-B`) the worker's metrics hook installs it instead."""
    import structlog

    log = structlog.get_logger("millpond.beat")
    try:
        from millpond_metrics import configure_metrics, plan_metrics
    except ImportError:
        if os.environ.get("OTEL_METRICS_EXPORTER", "none").strip().lower() not in ("", "none"):
            log.warning("OTEL_METRICS_EXPORTER is set but millpond-metrics is not installed: "
                        "pip install millpond-metrics for the tick counters")  # fmt: skip
        return None
    plan = plan_metrics("millpond-beat")
    if plan is None:
        return None
    if "prometheus" in plan.exporters:
        log.warning("millpond beat serves no /metrics endpoint: the prometheus exporter is "
                    "ignored here; use otlp, or run the scheduler in a worker with -B")  # fmt: skip
        plan = replace(plan, exporters=tuple(e for e in plan.exporters if e != "prometheus"))
        if not plan.exporters:
            return None
    provider, _resource, _prometheus = configure_metrics(plan)
    return provider


def print_list(beat: Beat, out: Any) -> None:
    """The `--list` table: each entry, its schedule, its next run local and UTC, and the leader."""
    now = beat.clock.time()
    holder = beat.claims.holder(beat.config.leader_key)
    if holder is None:
        leader = "none"
    elif holder.owner:
        leader = f"{holder.owner} (lease {holder.remaining:.1f}s left)"
    else:  # the broker does not say who holds a claim: the last elected replica says it
        state = beat.claims.load_state(beat.config.state_key)
        leader = f"{state.get(LEADER_FIELD, 'a replica')} (claim held)"
    print(f"leader: {leader}", file=out)
    ticks = beat.next_ticks(now)
    state = beat.claims.load_state(beat.config.state_key)
    rows = [("ENTRY", "TASK", "SCHEDULE", "NEXT (LOCAL)", "NEXT (UTC)", "LAST TICK (UTC)")]
    for name, entry in sorted(beat.entries.items()):
        due = ticks.get(name)
        if due is None:
            local = utc = "never"
        else:
            local = datetime.fromtimestamp(due, entry.tz).strftime("%Y-%m-%d %H:%M:%S %Z")
            utc = datetime.fromtimestamp(due, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        schedule = entry.schedule.describe()
        if entry.zone_name != "UTC" and not isinstance(entry.schedule, every):
            schedule += f" [{entry.zone_name}]"
        try:  # the last tick handled (published, or dropped by catch_up), or when it started
            last = datetime.fromtimestamp(float(state[name]), UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        except (KeyError, ValueError):
            last = "-"
        rows.append((name, entry.task, schedule, local, utc, last))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


COMMAND = BeatCommand()
