"""MQTT topic layout, one versioned root for everything edgefleet sends.

    edgefleet/v1/dev/{device_id}/down/desired          server -> device, retained, signed DesiredState
    edgefleet/v1/dev/{device_id}/down/cmd              server -> device, signed Command (QoS 1)
    edgefleet/v1/dev/{device_id}/down/chunk/{art_id}   server -> device, chunks served on request
    edgefleet/v1/dev/{device_id}/up/state              device -> server, retained StateReport (birth / Will)
    edgefleet/v1/dev/{device_id}/up/telemetry          device -> server, Telemetry
    edgefleet/v1/dev/{device_id}/up/event              device -> server, Event
    edgefleet/v1/dev/{device_id}/up/chunkreq           device -> server, ChunkRequest
    edgefleet/v1/dev/{device_id}/up/enroll             device -> server, EnrollRequest
    edgefleet/v1/dev/{device_id}/up/measure            device -> server, Measurement (latency of a variant)
    edgefleet/v1/art/{art_id}                          server -> many devices, shared chunk stream

The generated broker ACL grants a device exactly these leaves (``server.broker.device_acl_lines``):
it reads its own ``down/desired``, ``down/cmd``, ``down/chunk/+`` and ``art/+``, and writes its own
six ``up/`` leaves. Device ids and artifact ids are validated so they can never smuggle MQTT
wildcards or separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from agent.errors import TopicError

ROOT = "edgefleet/v1"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ARTIFACT_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_TOPIC_LENGTH = 256


class Channel(str, Enum):
    """The leaf of a topic: which message type travels there."""

    DESIRED = "down/desired"
    COMMAND = "down/cmd"
    CHUNK = "down/chunk"
    STATE = "up/state"
    TELEMETRY = "up/telemetry"
    EVENT = "up/event"
    CHUNK_REQUEST = "up/chunkreq"
    ENROLL = "up/enroll"
    MEASUREMENT = "up/measure"
    ARTIFACT = "art"


@dataclass(frozen=True)
class ParsedTopic:
    channel: Channel
    device_id: str | None = None
    artifact_id: str | None = None


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.match(device_id):
        raise TopicError(
            f"invalid device id {device_id!r}: 1-64 characters of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return device_id


def validate_artifact_id(artifact_id: str) -> str:
    if not ARTIFACT_ID_PATTERN.match(artifact_id):
        raise TopicError(f"invalid artifact id {artifact_id!r}: expected 32 lowercase hex digits")
    return artifact_id


def device_topic(device_id: str, channel: Channel, artifact_id: str | None = None) -> str:
    """The topic for one device's channel (CHUNK needs the artifact id)."""
    if channel is Channel.ARTIFACT:
        raise TopicError("the shared artifact channel is not per device; use artifact_topic()")
    base = f"{ROOT}/dev/{validate_device_id(device_id)}/{channel.value}"
    if channel is Channel.CHUNK:
        if artifact_id is None:
            raise TopicError("a chunk topic needs an artifact id")
        return f"{base}/{validate_artifact_id(artifact_id)}"
    return base


def artifact_topic(artifact_id: str) -> str:
    """The shared per-artifact topic a group rollout streams chunks on (once for all devices)."""
    return f"{ROOT}/art/{validate_artifact_id(artifact_id)}"


def device_down_filter(device_id: str) -> str:
    """What an agent subscribes to for its own down channels."""
    return f"{ROOT}/dev/{validate_device_id(device_id)}/down/#"


#: What a server subscribes to for every device's up channels.
ALL_DEVICES_UP_FILTER = f"{ROOT}/dev/+/up/#"


def shared_subscription(topic_filter: str, group: str = "edgefleet-server") -> str:
    """MQTT 5 shared subscription so several server processes split device traffic."""
    return f"$share/{group}/{topic_filter}"


def parse_topic(topic: str) -> ParsedTopic:
    """Classify a topic; raises TopicError for anything outside the layout above."""
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic longer than {MAX_TOPIC_LENGTH} characters")
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is outside {ROOT}/")
    parts = topic[len(prefix) :].split("/")
    if len(parts) == 2 and parts[0] == "art":
        return ParsedTopic(Channel.ARTIFACT, artifact_id=validate_artifact_id(parts[1]))
    if len(parts) >= 4 and parts[0] == "dev":
        device_id = validate_device_id(parts[1])
        leaf = "/".join(parts[2:4])
        if leaf == Channel.CHUNK.value and len(parts) == 5:
            return ParsedTopic(Channel.CHUNK, device_id, validate_artifact_id(parts[4]))
        if len(parts) == 4:
            for channel in Channel:
                if channel.value == leaf and channel not in (Channel.CHUNK, Channel.ARTIFACT):
                    return ParsedTopic(channel, device_id)
    raise TopicError(f"topic {topic!r} does not match the edgefleet layout")
