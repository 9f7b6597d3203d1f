"""``ShardedLink``: device topics to their own shard, shared streams to every shard, connected = all connected."""

from __future__ import annotations

import threading
from typing import cast

from agent.protocol.shards import shard_of
from agent.protocol.topics import ROOT
from server.publisher import MqttLink
from server.shards import ShardedLink


class FakeLink:
    def __init__(self, url: str) -> None:
        self.host, self.port = url.rsplit(":", 1)[0].split("//")[1], int(url.rsplit(":", 1)[1])
        self.connected = threading.Event()
        self.published: list[tuple[str, bytes, bool]] = []
        self.started = self.stopped = False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))

    def start(self, *, wait_s: float = 10.0) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def sweep_retained(self) -> None:
        pass


def _link() -> tuple[ShardedLink, list[FakeLink]]:
    made: list[FakeLink] = []

    def make(url: str) -> MqttLink:
        made.append(FakeLink(url))
        return cast(MqttLink, made[-1])

    return ShardedLink(["mqtt://a:1", "mqtt://b:2", "mqtt://c:3"], make), made


def test_device_topics_go_to_their_shard_and_streams_to_all() -> None:
    link, fakes = _link()
    assert [(f.host, f.port) for f in fakes] == [("a", 1), ("b", 2), ("c", 3)]
    ids = [f"dev-{i:04d}" for i in range(30)]
    for d in ids:
        link.publish(f"{ROOT}/dev/{d}/down/desired", d.encode(), retain=True)
    for i, fake in enumerate(fakes):
        assert {p.decode() for _, p, _ in fake.published} == {d for d in ids if shard_of(d, 3) == i}
        assert all(retain for *_, retain in fake.published)
    link.publish(f"{ROOT}/art/{'0' * 32}", b"chunk")
    assert all(f.published[-1] == (f"{ROOT}/art/{'0' * 32}", b"chunk", False) for f in fakes)


def test_connected_only_while_every_shard_is() -> None:
    link, fakes = _link()
    link.start(wait_s=0)
    assert all(f.started for f in fakes)
    assert not link.connected.is_set()
    for f in fakes[:2]:
        f.connected.set()
    assert not link.connected.is_set()  # one shard down pauses the outbox for all (docs/scale.md)
    fakes[2].connected.set()
    assert link.connected.is_set()
    assert link.flush(timeout_s=0.1)
    link.stop()
    assert all(f.stopped for f in fakes)
