"""Admin pages: the beat schedule (editable; a change reaches `millpond beat` within
`beat.reload_interval`) and the stored task results (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from millpond_django.models import PeriodicTask, TaskResult


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(admin.ModelAdmin):  # type: ignore[misc]
    list_display = ("name", "task", "kind", "every", "crontab", "run_at", "enabled", "last_run_at")
    list_filter = ("enabled", "kind", "queue")
    search_fields = ("name", "task")
    readonly_fields = ("last_run_at", "total_run_count", "date_changed")
    fieldsets = (
        (None, {"fields": ("name", "task", "enabled", "description")}),
        ("Schedule", {"fields": ("kind", "every", "crontab", "timezone", "run_at")}),
        ("Arguments", {"fields": ("args", "kwargs", "queue", "expires")}),
        ("Runs", {"fields": ("last_run_at", "total_run_count", "date_changed")}),
    )
    actions = ("enable", "disable")

    @admin.action(description="Enable the selected periodic tasks")  # type: ignore[untyped-decorator]
    def enable(self, request: Any, queryset: Any) -> None:
        self._set_enabled(queryset, True)

    @admin.action(description="Disable the selected periodic tasks")  # type: ignore[untyped-decorator]
    def disable(self, request: Any, queryset: Any) -> None:
        self._set_enabled(queryset, False)

    def _set_enabled(self, queryset: Any, enabled: bool) -> None:
        from millpond_django.models import schedule_changed

        queryset.update(enabled=enabled)
        schedule_changed(queryset.db)


@admin.register(TaskResult)
class TaskResultAdmin(admin.ModelAdmin):  # type: ignore[misc]
    list_display = ("task_id", "task_name", "status", "date_done")
    list_filter = ("status", "task_name")
    search_fields = ("task_id", "task_name")
    readonly_fields = tuple(f.name for f in TaskResult._meta.fields)
