"""An app's hook chain: the installed hooks the worker made before importing the app are the ones
the app keeps (one object per hook for the process's life), with the app's own hooks after them."""

from __future__ import annotations

from typing import Any

from millpond import Millpond
from millpond.contracts.hooks import Hooks, Publication
from millpond.testing.fixtures import unique


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


class PublishLog(Hooks):
    """Which publishes it saw begin and end, with the token it gave each."""

    def __init__(self, name: str) -> None:
        self.name, self.seen = name, []

    def before_publish(self, publication: Publication) -> Any:
        self.seen.append(("before", publication.task_id))
        return self.name

    def after_publish(
        self, publication: Publication, token: Any, error: BaseException | None
    ) -> None:
        assert token == self.name, "a token reached another hook's second half"
        self.seen.append(("after", publication.task_id))


def test_hooks_added_while_a_publish_is_under_way_do_not_break_it() -> None:
    """The chain that saw a publish begin sees it end: a hook added meanwhile (from another
    thread, inside a `publishing_together` block) gets neither half, and the sender gets no error
    for a message the broker already took."""
    queue = unique("late-hooks")
    app = Millpond("late", broker_url=f"memory://{queue}", default_queue=queue)
    first, late = PublishLog("first"), PublishLog("late")
    app.add_hooks(first)
    with app.publishing_together():
        sent = app.send_task("t.a")
        app.add_hooks(late)
    assert app.broker.queue_length(queue) == 1
    assert first.seen == [("before", sent.id), ("after", sent.id)]
    assert late.seen == []
    again = app.send_task("t.b")  # from now on the late hook sees publishes too
    assert late.seen == [("before", again.id), ("after", again.id)]
    app.close()
