"""The observability app, imported by a module that configures the root logger itself first:
millpond must leave that configuration alone."""

import logging

logging.basicConfig(format="USER %(message)s", level=logging.INFO)

from tests.observability.obs_app import app  # noqa: E402

__all__ = ["app"]
