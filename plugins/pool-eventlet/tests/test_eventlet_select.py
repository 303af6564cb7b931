"""eventlet's green select can return another call's result; the pool's patch replaces it."""

from __future__ import annotations

import select
import selectors
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from millpond_pool_eventlet import greenselect

pytestmark = pytest.mark.green


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(3)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def _two_ready_then_ask_for_a_third(
    fn: Callable[..., Any], pairs: list[tuple[socket.socket, socket.socket]]
) -> tuple[list[Any], list[Any]]:
    (a, a_peer), (b, b_peer), (c, _c_peer) = pairs
    a_peer.send(b"x")
    b_peer.send(b"x")
    first, _, _ = fn([a, b], [], [], 1.0)
    second, _, _ = fn([c], [], [], 0.05)  # c is never readable
    return first, second


def test_the_patched_select_returns_only_what_it_was_asked(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    assert select.select is greenselect.select, "patch() did not install the corrected select"
    first, second = _two_ready_then_ask_for_a_third(select.select, pairs)
    assert first
    assert all(any(s is asked for asked in (pairs[0][0], pairs[1][0])) for s in first)
    assert second == [], f"select returned {second} for a socket that was never readable"


def test_selectors_use_it_too(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (a, a_peer), (b, b_peer), (c, _c_peer) = pairs
    a_peer.send(b"x")
    b_peer.send(b"x")
    with selectors.DefaultSelector() as first:
        first.register(a, selectors.EVENT_READ)
        first.register(b, selectors.EVENT_READ)
        assert first.select(1.0)
    with selectors.DefaultSelector() as second:
        second.register(c, selectors.EVENT_READ)
        assert second.select(0.05) == []


def test_eventlets_own_select_still_has_the_bug(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """When this fails, eventlet fixed its select upstream and greenselect can go."""
    assert greenselect.upstream is not None
    _first, second = _two_ready_then_ask_for_a_third(greenselect.upstream, pairs)
    assert second, "eventlet's own select no longer returns a stale result: drop greenselect"
    assert second[0] is not pairs[2][0]
