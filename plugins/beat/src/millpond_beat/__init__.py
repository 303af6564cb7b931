"""millpond-beat: periodic tasks for millpond, highly available, each tick published once.

    from millpond import Millpond
    from millpond_beat import crontab

    app = Millpond("shop")

    @app.periodic_task(crontab("0 7 * * mon-fri"), timezone="Europe/Berlin")
    def morning_report() -> None: ...

    $ millpond beat -A shop:app          # on as many replicas as you like
    $ millpond beat -A shop:app --list   # entries, next runs, the leader

See docs/beat.md. Importing this package loads neither the scheduler nor a broker client, so an app
module can use the schedule helpers (`every`, `crontab`, `at`) and `preview` at no cost.
"""

from __future__ import annotations

from millpond_beat.clock import Clock, FakeClock, SystemClock
from millpond_beat.preview import preview
from millpond_beat.schedules import Schedule, ScheduleError, at, crontab, every

__all__ = [
    "Clock",
    "FakeClock",
    "Schedule",
    "ScheduleError",
    "SystemClock",
    "at",
    "crontab",
    "every",
    "preview",
]
__version__ = "0.1.0"
