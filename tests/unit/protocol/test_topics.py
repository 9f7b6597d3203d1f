from __future__ import annotations

import pytest

from agent.errors import TopicError
from agent.protocol.topics import (
    Channel,
    ParsedTopic,
    artifact_topic,
    device_down_filter,
    device_topic,
    parse_topic,
    shared_subscription,
)

ART = "0123456789abcdef" * 2


@pytest.mark.parametrize("channel", [c for c in Channel if c not in (Channel.CHUNK, Channel.ARTIFACT)])
def test_device_topics_round_trip(channel: Channel) -> None:
    topic = device_topic("pi-01", channel)
    assert topic == f"edgefleet/v1/dev/pi-01/{channel.value}"
    assert parse_topic(topic) == ParsedTopic(channel, "pi-01")


def test_chunk_and_artifact_topics() -> None:
    assert parse_topic(device_topic("d", Channel.CHUNK, ART)) == ParsedTopic(Channel.CHUNK, "d", ART)
    assert parse_topic(artifact_topic(ART)) == ParsedTopic(Channel.ARTIFACT, artifact_id=ART)
    assert device_down_filter("d") == "edgefleet/v1/dev/d/down/#"
    assert shared_subscription("a/b") == "$share/edgefleet-server/a/b"


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "-x", "a" * 65, "dév", "a b"])
def test_device_ids_cannot_smuggle_wildcards_or_separators(device_id: str) -> None:
    with pytest.raises(TopicError):
        device_topic(device_id, Channel.STATE)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/dev/d/up/state",
        "edgefleet/v2/dev/d/up/state",
        "edgefleet/v1/dev/d/up/nope",
        "edgefleet/v1/dev/d/up/state/extra",
        "edgefleet/v1/art/xyz",
        "edgefleet/v1/dev/d/down/chunk",
        "edgefleet/v1/dev/+/up/state",
        "edgefleet/v1/" + "a" * 300,
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)
