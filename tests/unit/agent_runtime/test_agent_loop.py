"""The agent loop's batching (``Agent._dispatch_queued``): what is queued is dispatched back to back, in order,
bounded, with a deferred desired state still taken between items, and STOP still ends the loop."""

from __future__ import annotations

import queue
from typing import Any

from agent.runtime.agent import DRAIN_MAX, STOP, Agent


class _Loop:
    """The three things ``_dispatch_queued`` touches on the agent: its inbox, dispatch and the deferred check."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.seen: list[Any] = []

    def _dispatch(self, item: Any) -> None:
        self.seen.append(item)

    def _take_deferred(self) -> None:
        self.seen.append("deferred?")


def test_queued_items_are_dispatched_in_order_up_to_the_bound() -> None:
    loop = _Loop()
    for i in range(1, DRAIN_MAX + 10):
        loop.inbox.put(i)
    assert Agent._dispatch_queued(loop, 0) is False  # type: ignore[arg-type]
    dispatched = [x for x in loop.seen if x != "deferred?"]
    assert dispatched == list(range(DRAIN_MAX))
    assert loop.seen.count("deferred?") == DRAIN_MAX - 1  # between items, as the loop did after each one
    assert loop.inbox.qsize() == 10  # the rest waits for the next turn (timers and state report run first)


def test_stop_behind_queued_items_ends_the_loop_after_what_came_before() -> None:
    loop = _Loop()
    for item in ("a", STOP, "b"):
        loop.inbox.put(item)
    assert Agent._dispatch_queued(loop, "first") is True  # type: ignore[arg-type]
    assert [x for x in loop.seen if x != "deferred?"] == ["first", "a"]
    assert loop.inbox.get_nowait() == "b"


def test_an_empty_queue_dispatches_only_the_item() -> None:
    loop = _Loop()
    assert Agent._dispatch_queued(loop, "only") is False  # type: ignore[arg-type]
    assert loop.seen == ["only"]
