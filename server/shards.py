"""Several independent brokers ("shards"): the server's links to all of them, and their configs.

Theory of operation (docs/scale.md)
    Each device belongs to one shard, ``agent.protocol.shards.shard_of(device_id, N)``, and only
    ever connects there; the brokers know nothing of each other. Every server process connects to
    every shard with one ``MqttLink`` each (same login, CA and client id: they are different brokers),
    so each broker sees the same server sessions and subscriptions as a single broker would:

    - a device topic (``edgefleet/v1/dev/{device}/...``: desired, commands, its own chunks, the
      clearing of a stray retained message) is published on that device's shard only;
    - a shared artifact stream (``edgefleet/v1/art/{artifact}``) is published on every shard (each
      broker fans it out to its own subscribers; one copy per shard crosses the server's link);
    - everything the devices send arrives on whichever link their shard is, into the one ingest.

    Retained messages, persistent sessions, QoS 1 and the per-device ACL are each mosquitto's own,
    on one broker, exactly as with a single broker: sharding changes where a device lives, not what
    its broker guarantees. What it does not give: a device moving between brokers keeps nothing (its
    session and retained state stay on the old shard), so the shard count is fixed per deployment
    (adding one moves ~1/(N+1) of the devices, which then start a fresh session and get their retained
    desired state republished by the server's outbox).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from agent.protocol.shards import shard_of
from agent.protocol.topics import ROOT
from server.publisher import MqttLink

__all__ = ["AllConnected", "ShardedLink", "shard_users", "topic_shard"]

_DEV = f"{ROOT}/dev/"


def topic_shard(topic: str, shards: int) -> int | None:
    """The shard a topic lives on: its device's for a device topic, None (= every shard) for the rest."""
    if topic.startswith(_DEV):
        device_id = topic[len(_DEV):].split("/", 1)[0]
        return shard_of(device_id, shards)
    return None


class AllConnected:
    """``connected.is_set()`` over several links: true only while every shard's link is up, so the outbox
    and housekeeping (which publish to any shard) wait for all of them; a publish to a shard that is down
    would hold an in-flight slot until its timeout."""

    def __init__(self, links: Sequence[MqttLink]) -> None:
        self._links = links

    def is_set(self) -> bool:
        return all(link.connected.is_set() for link in self._links)

    def wait(self, timeout: float | None = None) -> bool:
        return all(link.connected.wait(timeout) for link in self._links)


class ShardedLink:
    """The ``MqttLink`` interface the server uses (publish, start, stop, flush, connected,
    sweep_retained), over one link per shard URL built by ``make_link(url)``, in the shards' order."""

    def __init__(self, urls: Sequence[str], make_link: Callable[[str], MqttLink]) -> None:
        if not urls:
            raise ValueError("no shard brokers")
        self.links = [make_link(url) for url in urls]
        self.connected = AllConnected(self.links)
        self.host, self.port = self.links[0].host, self.links[0].port

    def __len__(self) -> int:
        return len(self.links)

    def describe(self) -> str:
        return ", ".join(f"{link.host}:{link.port}" for link in self.links)

    def start(self, *, wait_s: float = 10.0) -> None:
        for link in self.links:
            link.start(wait_s=wait_s)

    def stop(self) -> None:
        for link in self.links:
            link.stop()

    def flush(self, timeout_s: float = 30.0) -> bool:
        flushed = [link.flush(timeout_s=timeout_s) for link in self.links]  # every link, even after a failure
        return all(flushed)

    def sweep_retained(self) -> None:
        for link in self.links:
            link.sweep_retained()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        shard = topic_shard(topic, len(self.links))
        targets = self.links if shard is None else [self.links[shard]]
        for link in targets:
            link.publish(topic, payload, retain=retain)


def shard_users(users: Mapping[str, str], server_logins: Sequence[str], shards: int) -> list[dict[str, str]]:
    """Split a broker password table (login -> hash) into one per shard: each device's login only on its own
    shard (a device cannot log in anywhere else), every server login on all of them."""
    out: list[dict[str, str]] = [{} for _ in range(shards)]
    servers = set(server_logins)
    for login, secret in users.items():
        if login in servers:
            for table in out:
                table[login] = secret
        else:
            out[shard_of(login, shards)][login] = secret
    return out
