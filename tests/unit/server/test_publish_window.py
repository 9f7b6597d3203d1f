"""The server link's publish window (server/publisher.py): paho keeps max_inflight in flight and queues as many
again; a publisher that finds 2 x max_inflight unacknowledged waits until only max_inflight are. No broker:
the link is never connected (paho queues QoS 1 messages for the session), acknowledgements are handed to the
link's ``on_publish`` as paho would."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from server.errors import PublishError
from server.publisher import MqttLink


def _link(max_inflight: int, publish_timeout_s: float = 60.0) -> MqttLink:
    return MqttLink(host="127.0.0.1", port=1, client_id="window-test", max_inflight=max_inflight, subscribe=False,
                    publish_timeout_s=publish_timeout_s)


def _ack(link: MqttLink, mid: int) -> None:
    link._on_publish(link.client, None, mid, 0, None)


def _wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _published_mids(link: MqttLink) -> list[int]:
    return sorted(link._pending)


def test_a_burst_of_twice_the_window_goes_to_paho_without_waiting() -> None:
    link = _link(4)
    for i in range(8):
        link.publish(f"t/{i}", b"x")
    assert link.unacknowledged == 8
    assert len(link._pending) == 8


def test_a_full_window_waits_for_the_low_level_then_goes_on() -> None:
    link = _link(4)
    for i in range(8):
        link.publish(f"t/{i}", b"x")
    mids = _published_mids(link)
    done = threading.Event()

    def ninth() -> None:
        link.publish("t/9", b"x")
        done.set()

    blocked = threading.Thread(target=ninth)
    blocked.start()
    _wait_for(lambda: link._waiting == 1, "the ninth publish to wait")
    for mid in mids[:3]:  # 8 -> 5 unacknowledged: still above max_inflight
        _ack(link, mid)
    assert link._waiting == 1 and not done.is_set() and link.unacknowledged == 5
    _ack(link, mids[3])  # 4 = max_inflight: the publisher goes on
    blocked.join(10)
    assert done.is_set()
    assert link.unacknowledged == 5
    assert link._waiting == 0


def test_an_acknowledgement_that_overtakes_its_publish_still_counts() -> None:
    link = _link(2)
    real = link.client.publish

    def publish_acked_at_once(*args: Any, **kwargs: Any) -> Any:
        info = real(*args, **kwargs)
        _ack(link, info.mid)  # paho's thread acknowledged it before publish() returned here
        return info

    link.client.publish = publish_acked_at_once  # type: ignore[method-assign]
    for i in range(10):  # 5 x the window: none waits, since every one is acknowledged
        link.publish(f"t/{i}", b"x")
    assert link.unacknowledged == 0
    assert not link._pending and not link._early


def test_a_window_that_never_drains_times_out_and_counts_nothing() -> None:
    link = _link(1, publish_timeout_s=0.2)
    link.publish("t/0", b"x")
    link.publish("t/1", b"x")
    with pytest.raises(PublishError, match="timed out"):
        link.publish("t/2", b"x")
    assert link.unacknowledged == 2
    assert link._waiting == 0


def test_a_refused_publish_gives_its_place_back() -> None:
    link = _link(2)
    with pytest.raises(ValueError):
        link.publish("bad/+/topic", b"x")  # paho refuses wildcards in a topic it publishes to
    assert link.unacknowledged == 0
