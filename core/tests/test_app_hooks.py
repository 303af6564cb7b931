"""An app's hook chain: the installed hooks the worker made before importing the app are the ones
the app keeps (one object per hook for the process's life), with the app's own hooks after them."""

from __future__ import annotations

from millpond import Millpond
from millpond.contracts.hooks import Hooks


class Recording(Hooks):
    """A hooks implementation that only needs to be told apart by identity."""


def test_hooks_in_use_are_kept_as_made_with_added_ones_after_them() -> None:
    app = Millpond("adopt", broker_url="memory://adopt-hooks")
    own, installed = Recording(), Recording()
    app.add_hooks(own)  # as an app module does while it is imported
    app.use_hooks([installed])
    assert [h for h in app.hooks.hooks if isinstance(h, Recording)] == [installed, own]
    later = Recording()
    app.add_hooks(later)  # added after the chain was made: still called
    assert later in app.hooks.hooks
    assert installed in app.hooks.hooks
    chain = app.hooks.hooks
    app.use_hooks(chain)  # as the worker hands back its chain: each hook is kept once
    assert app.hooks.hooks == chain
    app.close()
