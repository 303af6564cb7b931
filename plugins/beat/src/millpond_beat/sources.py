"""Schedule sources: entries that live outside code and settings, such as a database table an
admin edits (millpond-django's `django` source).

A source is named by the `beat.source` setting and found in the `millpond.beat_sources`
entry-point group; only the named one is imported. Beat reads its `schedule()` at start-up and,
every `beat.reload_interval` seconds, asks for its `version()`: a cheap token (a change counter,
a row count and a timestamp) that differs whenever the schedule may have changed. Only then is the
schedule read again and checked like the settings' entries, so an edit takes effect within one
reload interval, without a restart, and an unchanged source costs one small query per interval.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from millpond.exceptions import ConfigurationError

if TYPE_CHECKING:
    from millpond.produce.app import Millpond

GROUP = "millpond.beat_sources"


class ScheduleSource(ABC):
    """Where some of beat's entries come from; made once per beat, with the app."""

    #: how entries of this source are named in errors and in `--list` (`source` of an Entry)
    label: str = "source"

    def __init__(self, app: Millpond) -> None:
        self.app = app

    @abstractmethod
    def version(self) -> Hashable:
        """A token that changes whenever `schedule()` may return something else; called every
        reload interval, so it must be cheap."""

    @abstractmethod
    def schedule(self) -> Mapping[str, Mapping[str, Any]]:
        """The enabled entries by name, each in Celery's beat_schedule shape (task, schedule or
        at, args, kwargs, queue, ...), as the `beat.schedule` setting takes them."""

    def published(self, name: str, tick: float) -> None:  # noqa: B027 - optional hook
        """This replica published the tick `tick` (epoch seconds) of entry `name` (a source
        may record it, e.g. as the row's last run). An error here is logged, never raised."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def load_source(name: str, app: Millpond) -> ScheduleSource:
    """The installed source `name`, made for `app`; a clear error when it is not installed."""
    found = list(entry_points(group=GROUP, name=name))
    if not found:
        installed = sorted({ep.name for ep in entry_points(group=GROUP)})
        raise ConfigurationError(
            f"setting 'beat.source' names {name!r}, but no beat schedule source of that name is "
            f"installed (installed: {', '.join(installed) or 'none'}); install the package that "
            "provides it (millpond-django for 'django') or clear the setting"
        )
    try:
        cls = found[0].load()
    except ImportError as exc:
        raise ConfigurationError(
            f"the beat schedule source {name!r} cannot be imported: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, ScheduleSource)):
        raise ConfigurationError(
            f"the beat schedule source {name!r} ({found[0].value}) is not a ScheduleSource class"
        )
    return cls(app)
