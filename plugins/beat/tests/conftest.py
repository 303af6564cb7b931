"""Fixtures of the beat tests."""

from __future__ import annotations

import pytest
from beat_helpers import TickRecorder


@pytest.fixture
def recorder() -> TickRecorder:
    return TickRecorder()
