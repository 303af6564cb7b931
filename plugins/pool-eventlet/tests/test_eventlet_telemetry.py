"""Tracing from a eventlet worker subprocess: OTLP/HTTP export from a greenlet, flushed at exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from millpond_green.kit import check_otlp_export_flushed_at_shutdown

pytestmark = [pytest.mark.green, pytest.mark.e2e]


def test_spans_are_exported_over_otlp_and_flushed_at_shutdown(tmp_path: Path) -> None:
    check_otlp_export_flushed_at_shutdown("eventlet", tmp_path)
