"""Schedules: when an entry's ticks fall, as instants (seconds since the epoch, UTC).

Every schedule answers one question, `next_after(t)`: the first tick strictly after the instant `t`,
or None when there is none (a one-off `at` that has passed). Ticks are instants, never "now plus a
delay", so every replica computes the same tick for the same entry and the tick itself names the
slot that is claimed (see `millpond_beat.scheduler`).

* `every(seconds)`: ticks at whole multiples of the period since `anchor` (the epoch by default),
  so `every(60)` ticks at each whole minute and every replica agrees without talking.
* `crontab(...)` / a five-field string: wall-clock times in the entry's time zone. Daylight saving
  time follows the rule cron (Vixie/cronie) follows, so a job never runs twice and a fixed-time job
  never silently disappears:

  - a wall time skipped by a spring-forward gap (02:30 in Europe/Berlin on the last Sunday of
    March) runs once, at the instant the gap ends (03:00 local);
  - a wall time repeated by a fall-back overlap runs once, at its first occurrence;
  - an entry whose hour field is `*` (hourly or more often) follows the real clock instead: in an
    overlap each real hour ticks (both 02:30s), and wall times inside a gap simply do not occur.

  As in Celery, a day must match both `day_of_month` and `day_of_week` when both are restricted.
* `at(when)`: one tick at that instant.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says what is wrong and what is allowed."""


def zone(name: str | tzinfo | None) -> tzinfo:
    """The time zone called `name` (an IANA name such as "Europe/Berlin", or "UTC")."""
    if name is None:
        return UTC
    if isinstance(name, tzinfo):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ScheduleError(
            f"a time zone must be an IANA name such as 'Europe/Berlin', got {name!r}"
        )
    if name.strip().upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin' or "
            "'America/New_York' (install the tzdata package where the system has none)"
        ) from None


class Schedule(ABC):
    """When the ticks of one entry fall."""

    @abstractmethod
    def next_after(self, t: float, tz: tzinfo) -> float | None:
        """The first tick strictly after the instant `t` (seconds since the epoch), or None."""

    @abstractmethod
    def describe(self) -> str:
        """A short text for `millpond beat --list` and log lines."""

    def due_between(self, since: float, until: float, tz: tzinfo) -> tuple[float | None, int]:
        """(the latest tick in (since, until], how many ticks fall there): what a scheduler that
        was away between the two instants missed. Counting stops at 100,000."""
        latest, count = None, 0
        tick = self.next_after(since, tz)
        while tick is not None and tick <= until and count < 100_000:
            latest, count = tick, count + 1
            tick = self.next_after(tick, tz)
        return latest, count


@dataclass(frozen=True, slots=True)
class every(Schedule):
    """Ticks every `seconds`, at `anchor + k * seconds` (the epoch by default)."""

    seconds: float
    anchor: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float):
            raise ScheduleError(f"an interval must be a number of seconds, got {self.seconds!r}")
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            raise ScheduleError(f"an interval must be more than 0 seconds, got {self.seconds!r}")

    def next_after(self, t: float, tz: tzinfo) -> float | None:
        k = math.floor((t - self.anchor) / self.seconds) + 1
        tick = self.anchor + k * self.seconds
        while tick <= t:  # float rounding right at a tick
            k += 1
            tick = self.anchor + k * self.seconds
        return tick

    def due_between(self, since: float, until: float, tz: tzinfo) -> tuple[float | None, int]:
        first = self.next_after(since, tz)
        assert first is not None
        if first > until:
            return None, 0
        count = math.floor((until - first) / self.seconds) + 1
        latest = first + (count - 1) * self.seconds
        return latest, count

    def describe(self) -> str:
        return f"every {self.seconds:g}s"


@dataclass(frozen=True, slots=True)
class at(Schedule):
    """One tick at `when` (an aware datetime, or epoch seconds; a naive datetime is read in the
    entry's time zone when the entry is built)."""

    when: datetime | float

    def __post_init__(self) -> None:
        if isinstance(self.when, bool) or not isinstance(self.when, datetime | int | float):
            raise ScheduleError(f"`at` takes a datetime or epoch seconds, got {self.when!r}")

    def instant(self, tz: tzinfo) -> float:
        when = self.when
        if isinstance(when, datetime):
            if when.tzinfo is None:
                when = when.replace(tzinfo=tz)
            return when.timestamp()
        return float(when)

    def next_after(self, t: float, tz: tzinfo) -> float | None:
        instant = self.instant(tz)
        return instant if instant > t else None

    def describe(self) -> str:
        when = self.when
        text = when.isoformat() if isinstance(when, datetime) else f"{when:g}"
        return f"at {text}"


# -- crontab ---------------------------------------------------------------------------------------

_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
#: the full names Celery also takes (it reads a name by its first three letters)
_FULL_NAMES = frozenset(
    {
        *("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"),
        *("january", "february", "march", "april", "june", "july", "august", "september"),
        *("october", "november", "december"),
    }
)
_PART = re.compile(r"^(?P<range>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>\d+))?$")
#: how far apart two offsets of one zone may be; bounds the search around a day's candidates
_MAX_SHIFT = timedelta(hours=3)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] = field(default_factory=dict)

    def parse(self, spec: object) -> frozenset[int]:
        """The values a field's text (or number, or collection of numbers) allows."""
        if isinstance(spec, bool):
            raise self.error(spec, "not a number")
        if isinstance(spec, int):
            return self.check(spec, {spec})
        if isinstance(spec, Iterable) and not isinstance(spec, str):
            values: set[int] = set()
            for item in spec:
                values |= self.parse(item)
            if not values:
                raise self.error(spec, "no values")
            return frozenset(values)
        if not isinstance(spec, str):
            raise self.error(spec, "not text or a number")
        values = set()
        for part in spec.strip().lower().split(","):
            match = _PART.match(part.strip())
            if not match:
                raise self.error(spec, f"cannot read {part!r}")
            step = int(match["step"]) if match["step"] else 1
            if step < 1:
                raise self.error(spec, "a step must be 1 or more")
            text = match["range"]
            if text == "*":
                low, high = self.low, self.high
            else:
                first, _, last = text.partition("-")
                low = self.value(first, spec)
                high = self.value(last, spec) if last else (self.high if match["step"] else low)
            if low > high:
                raise self.error(spec, f"the range {text!r} runs backwards")
            values.update(range(low, high + 1, step))
        return self.check(spec, values)

    def value(self, text: str, spec: object) -> int:
        if text in self.names:
            return self.names[text]
        if text in _FULL_NAMES and text[:3] in self.names:  # "monday", "january": as Celery
            return self.names[text[:3]]
        if not text.isdigit():
            raise self.error(spec, f"{text!r} is not a number or a known name")
        number = int(text)
        top = 7 if self.name == "day_of_week" else self.high
        if not self.low <= number <= top:
            raise self.error(spec, f"{number} is outside {self.low}..{top}")
        return number

    def check(self, spec: object, values: set[int]) -> frozenset[int]:
        if self.name == "day_of_week":
            values = {0 if v == 7 else v for v in values}
        bad = sorted(v for v in values if not self.low <= v <= self.high)
        if bad:
            raise self.error(spec, f"{bad[0]} is outside {self.low}..{self.high}")
        return frozenset(values)

    def error(self, spec: object, why: str) -> ScheduleError:
        names = f" or names ({', '.join(self.names)})" if self.names else ""
        return ScheduleError(
            f"bad crontab {self.name} {spec!r}: {why}; expected *, a number from {self.low} to "
            f"{self.high}{names}, a range a-b, a step */n or a-b/n, or a comma-separated list"
        )


_FIELDS = {
    "minute": _Field("minute", 0, 59),
    "hour": _Field("hour", 0, 23),
    "day_of_month": _Field("day_of_month", 1, 31),
    "month_of_year": _Field("month_of_year", 1, 12, _MONTHS),
    "day_of_week": _Field("day_of_week", 0, 6, _DAYS),
}
#: the days each month can have (February: 29), to refuse dates that never exist
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True, slots=True, init=False)
class crontab(Schedule):
    """Wall-clock times in the entry's time zone: `crontab(minute="30", hour="2")`, or one
    five-field string `crontab("30 2 * * *")` (minute hour day-of-month month day-of-week)."""

    minute: frozenset[int]
    hour: frozenset[int]
    day_of_month: frozenset[int]
    month_of_year: frozenset[int]
    day_of_week: frozenset[int]
    text: str

    def __init__(
        self,
        minute: object = "*",
        hour: object = "*",
        day_of_week: object = "*",
        day_of_month: object = "*",
        month_of_year: object = "*",
    ) -> None:
        given = {
            "minute": minute,
            "hour": hour,
            "day_of_week": day_of_week,
            "day_of_month": day_of_month,
            "month_of_year": month_of_year,
        }
        if isinstance(minute, str) and len(minute.split()) > 1:
            parts = minute.split()
            if len(parts) != 5 or any(v != "*" for v in (hour, day_of_week, day_of_month)):
                raise ScheduleError(
                    f"bad crontab {minute!r}: a crontab string has five fields, minute hour "
                    "day-of-month month day-of-week, e.g. '30 2 * * *'"
                )
            given = dict(
                zip(
                    ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"),
                    parts,
                    strict=True,
                )
            )
        parsed = {name: _FIELDS[name].parse(value) for name, value in given.items()}
        for name, values in parsed.items():
            object.__setattr__(self, name, values)
        text = " ".join(
            _shown(given[name])
            for name in ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
        )
        object.__setattr__(self, "text", text)
        if not any(
            day <= _MONTH_DAYS[month - 1]
            for month in self.month_of_year
            for day in self.day_of_month
        ):
            raise ScheduleError(f"crontab {text!r} names a day that no month in it has")

    @property
    def follows_real_clock(self) -> bool:
        """Whether the hour is unrestricted: then DST overlaps tick twice and gaps not at all."""
        return len(self.hour) == 24

    def describe(self) -> str:
        return f"crontab {self.text}"

    def due_between(self, since: float, until: float, tz: tzinfo) -> tuple[float | None, int]:
        """As `Schedule.due_between`, exactly and without a cap, day by day: a day whose UTC
        offset does not change and that lies wholly in the span counts all its walls at once;
        the others (the span's ends, DST days) are counted wall by wall under the rule of
        `instants`. A minutely entry away 100 days costs milliseconds, not minutes (stepping
        `next_after` tick by tick blocked the loop for seconds per day away, past the lease)."""
        if until <= since:
            return None, 0
        real = self.follows_real_clock
        hours, minutes = sorted(self.hour), sorted(self.minute)
        per_day, last_wall = len(hours) * len(minutes), hours[-1] * 3600 + minutes[-1] * 60
        latest: float | None = None
        count = 0
        day = datetime.fromtimestamp(since, tz).date() - timedelta(days=1)
        end = datetime.fromtimestamp(until, tz).date() + timedelta(days=1)
        while day <= end:
            if self._day_matches(day):
                midnight = datetime(day.year, day.month, day.day)
                low = _naive_utc(midnight, tz)
                high = _naive_utc(midnight + timedelta(days=1), tz)
                steady = (
                    datetime.fromtimestamp(low, tz).utcoffset()
                    == datetime.fromtimestamp(high, tz).utcoffset()
                    and high - low == 86400
                )
                if steady and since < low and high <= until:
                    count += per_day
                    latest = max(latest or low, low + last_wall)
                else:
                    seen: set[float] = set()
                    for h in hours:
                        for m in minutes:
                            for instant in instants(midnight.replace(hour=h, minute=m), tz,
                                                    real_clock=real):  # fmt: skip
                                if since < instant <= until:
                                    seen.add(instant)
                    count += len(seen)
                    if seen:
                        latest = max(latest or 0.0, *seen)
            day += timedelta(days=1)
        return latest, count

    def _day_matches(self, d: date) -> bool:
        return (
            d.month in self.month_of_year
            and d.day in self.day_of_month
            and (d.isoweekday() % 7) in self.day_of_week
        )

    def next_after(self, t: float, tz: tzinfo) -> float | None:
        start = datetime.fromtimestamp(t, tz).replace(tzinfo=None)
        floor = start - _MAX_SHIFT
        day = floor.date()
        hours, minutes = sorted(self.hour), sorted(self.minute)
        for _ in range(366 * 8 + 2):  # a matching day exists within 8 years (checked above)
            if self._day_matches(day):
                best = self._first_on(day, t, hours=hours, minutes=minutes, floor=floor, tz=tz)
                if best is not None:
                    return best
            day += timedelta(days=1)
        return None  # pragma: no cover - refused when the crontab was made

    def _first_on(
        self,
        day: date,
        t: float,
        *,
        hours: list[int],
        minutes: list[int],
        floor: datetime,
        tz: tzinfo,
    ) -> float | None:
        """The earliest tick on one local day after `t`: walls are in order, instants nearly
        so (an overlap can put a later wall's first occurrence before an earlier wall's second),
        so the search stops only once a wall lies clearly past the best instant found."""
        best: float | None = None
        for h in hours:
            if datetime(day.year, day.month, day.day, h, 59) < floor:
                continue
            for m in minutes:
                wall = datetime(day.year, day.month, day.day, h, m)
                if wall < floor:
                    continue
                for instant in instants(wall, tz, real_clock=self.follows_real_clock):
                    if instant > t and (best is None or instant < best):
                        best = instant
                if best is not None and _naive_utc(wall, tz) > best + _MAX_SHIFT.total_seconds():
                    return best
        return best


def _naive_utc(wall: datetime, tz: tzinfo) -> float:
    return wall.replace(tzinfo=tz, fold=0).timestamp()


def _shown(value: object) -> str:
    if isinstance(value, Iterable) and not isinstance(value, str):
        return ",".join(str(v) for v in sorted(value))
    return str(value).strip()


def instants(wall: datetime, tz: tzinfo, *, real_clock: bool = False) -> list[float]:
    """The instants at which a naive wall-clock time happens in `tz`, under the DST rule of the
    module docstring: one instant normally; in an overlap the first (both when `real_clock`); in
    a gap the instant the gap ends (none when `real_clock`)."""
    first = wall.replace(tzinfo=tz, fold=0).timestamp()
    second = wall.replace(tzinfo=tz, fold=1).timestamp()
    if first == second:
        return [first]
    exists = datetime.fromtimestamp(first, tz).replace(tzinfo=None) == wall
    if exists:  # an overlap: fold 0 is the earlier occurrence
        earlier, later = sorted((first, second))
        return [earlier, later] if real_clock else [earlier]
    if real_clock:
        return []
    return [_gap_end(min(first, second), max(first, second), tz)]


def _gap_end(low: float, high: float, tz: tzinfo) -> float:
    """The instant a gap ends (the first second with the new offset), between two instants that
    lie on either side of it."""
    target = datetime.fromtimestamp(high, tz).utcoffset()
    lo, hi = math.floor(low), math.ceil(high)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return float(hi)


# -- from the ways people write them ---------------------------------------------------------------


def from_celery(obj: object) -> Schedule | None:
    """The schedule a Celery schedule object describes (read from its public fields; celery is
    not imported), None if `obj` is not one; a Celery schedule millpond cannot run raises."""
    module = type(obj).__module__
    if not module.startswith("celery."):
        return None
    kind = type(obj).__name__
    if getattr(obj, "nowfun", None) is not None:
        raise ScheduleError(
            f"Celery's {kind}(..., nowfun=...) is not supported by millpond beat (its clock, "
            "often there to tick in another time zone, would be dropped): remove nowfun and "
            "give the entry a timezone, e.g. timezone = 'Europe/Berlin'"
        )
    if kind == "crontab":
        fields = {
            name: getattr(obj, f"_orig_{name}")
            for name in ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")
        }
        return crontab(**fields)
    if kind == "schedule":
        if getattr(obj, "relative", False):
            raise ScheduleError(
                "Celery's schedule(..., relative=True) is not supported: intervals tick at whole "
                "multiples of their period so that every replica agrees on each tick; remove "
                "relative=True"
            )
        run_every = obj.run_every  # type: ignore[attr-defined]
        return every(run_every.total_seconds())
    raise ScheduleError(
        f"Celery's {kind} schedule is not supported by millpond beat; use every(...), "
        "crontab(...) or at(...) (solar events: compute the times and use at(...))"
    )


def parse(value: object) -> Schedule:
    """A schedule from any of the ways an entry may give one: a Schedule, seconds, a
    `timedelta`, a five-field crontab string, a table of crontab fields (`{minute = "30", hour =
    "2"}`), `{every = 30}`, `{at = ...}`, or a Celery schedule object."""
    if isinstance(value, Schedule):
        return value
    celery = from_celery(value)
    if celery is not None:
        return celery
    if isinstance(value, timedelta):
        return every(value.total_seconds())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return every(float(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            return every(float(text))
        except ValueError:
            pass
        return crontab(text)
    if isinstance(value, datetime):
        return at(value)
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"every"}:
            return every(_seconds(value["every"]))
        if keys == {"at"}:
            return at(_when(value["at"]))
        if keys and keys <= set(_FIELDS):
            return crontab(**{k: str(v) if isinstance(v, int) else v for k, v in value.items()})
        raise ScheduleError(
            f"cannot read the schedule table {value!r}: give {{every = SECONDS}}, {{at = TIME}} "
            "or crontab fields (minute, hour, day_of_week, day_of_month, month_of_year)"
        )
    raise ScheduleError(
        f"cannot read the schedule {value!r}: give seconds, a timedelta, a crontab string such "
        "as '*/5 * * * *', crontab(...), every(...) or at(...)"
    )


def _seconds(value: object) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    raise ScheduleError(f"an interval must be a number of seconds, got {value!r}")


def _when(value: object) -> datetime | float:
    if isinstance(value, datetime):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ScheduleError(
        f"`at` takes a datetime, an ISO 8601 time such as '2026-12-24T18:00:00+01:00', or "
        f"epoch seconds, got {value!r}"
    )
