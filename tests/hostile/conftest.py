"""The hostile-input tests drive real workers with the fault suite's rig (tests/faults)."""

from tests.faults.conftest import make_rig

__all__ = ["make_rig"]
