"""The ``measurement`` message: round trip, caps and the bounds that keep the server's aggregates sane."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.errors import MalformedMessageError, MessageTooLargeError
from agent.protocol.measurement import Measurement
from agent.protocol.messages import decode_up, encode
from agent.protocol.topics import Channel, device_topic, parse_topic
from server.broker import device_acl_lines


def _good(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "schema": "1.0", "type": "measurement", "device_id": "pi-1", "ts": 1.0, "model": "digits", "version": 2,
        "source": "warmup", "runs": 20, "p50_ms": 1.5, "p95_ms": 2.0, "artifact_id": "ab" * 16,
        "variant": "int8-dynamic", "load_avg": [0.5, 0.4, 0.3], "temperature_c": 51.0, "governor": "ondemand",
    }
    d.update(over)
    return d


def test_round_trip_keeps_every_field_and_unknown_ones() -> None:
    raw = json.dumps(_good(future_field={"x": 1})).encode()
    m = decode_up(raw, "measurement")
    assert isinstance(m, Measurement)
    assert (m.p50_ms, m.p95_ms, m.load_avg, m.variant) == (1.5, 2.0, (0.5, 0.4, 0.3), "int8-dynamic")
    again = decode_up(encode(m), "measurement")
    assert again == m
    assert json.loads(encode(m))["future_field"] == {"x": 1}


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"p50_ms": -1.0}, "p50_ms"),
        ({"p95_ms": 1e12}, "p95_ms"),
        ({"p95_ms": 1.0}, "p95_ms"),  # below p50
        ({"runs": 0}, "runs"),
        ({"source": "guess"}, "source"),
        ({"artifact_id": "AB" * 16}, "artifact_id"),
        ({"model": "../etc"}, "model"),
        ({"load_avg": [1, 2]}, "load_avg"),
        ({"load_avg": [1, True, 2]}, "load_avg"),
        ({"temperature_c": 1e9}, "temperature_c"),
        ({"version": True}, "version"),
    ],
)
def test_bad_fields_are_refused_by_name(over: dict[str, object], field: str) -> None:
    with pytest.raises(MalformedMessageError) as err:
        decode_up(json.dumps(_good(**over)).encode(), "measurement")
    assert err.value.field == field


def test_nan_and_oversize_are_refused_before_use() -> None:
    with pytest.raises(MalformedMessageError):
        decode_up(json.dumps(_good()).replace("1.5", "NaN").encode(), "measurement")
    with pytest.raises(MessageTooLargeError):
        decode_up(json.dumps(_good(pad="x" * 5000)).encode(), "measurement")


def test_topic_and_acl_leaf() -> None:
    topic = device_topic("pi-1", Channel.MEASUREMENT)
    assert topic == "edgefleet/v1/dev/pi-1/up/measure"
    assert parse_topic(topic).channel is Channel.MEASUREMENT
    assert "pattern write edgefleet/v1/dev/%u/up/measure" in device_acl_lines()


def _probe_args() -> dict[str, object]:
    from agent.protocol.messages import ArtifactInfo, HealthSpec, ModelRef, RuntimeSpec, TensorSpec, WrappedKey
    from agent.protocol.probe import ProbeRequest, ProbeVariant

    info = ArtifactInfo("ab" * 16, 1000, "cd" * 32, "zlib", 900, "ef" * 32, 1024, 1)
    key = WrappedKey(bytes(32), bytes(48))
    health = HealthSpec(inputs=(TensorSpec("x", "float32", (1, 4)),), outputs=(), latency_budget_ms=10.0)
    variants = (ProbeVariant("fp32", info, key, RuntimeSpec("onnx", "onnxruntime")),)
    return ProbeRequest("p1", ModelRef("m", 1), health, variants).to_args()


def test_probe_args_round_trip_and_refuse_bad_shapes() -> None:
    from agent.protocol.probe import MAX_PROBE_BYTES, ProbeRequest

    args: Any = json.loads(json.dumps(_probe_args()))
    request = ProbeRequest.from_args(args)
    assert request.to_args() == args and request.variants[0].variant == "fp32"
    bad: list[dict[str, object]] = [{}, {"probe": []}, {"probe": {**args["probe"], "variants": []}},
                                    {"probe": {**args["probe"], "variants": ["x"]}},
                                    {"probe": {**args["probe"], "variants": [args["probe"]["variants"][0]] * 2}}]
    huge = json.loads(json.dumps(args))
    huge["probe"]["variants"][0]["artifact"]["size"] = MAX_PROBE_BYTES + 1
    bad.append(huge)
    for b in bad:
        with pytest.raises(MalformedMessageError):
            ProbeRequest.from_args(b)
