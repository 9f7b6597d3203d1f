"""Codecs: round trips, unknown fields kept, unknown majors refused, caps before parsing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import MalformedMessageError, MessageTooLargeError, ProtocolError, UnsupportedVersionError
from agent.protocol import messages as m

UP = [
    m.StateReport(
        device_id="d1",
        online=True,
        session=3,
        ts=1.0,
        lifecycle="idle",
        active=m.ActiveModel("digits", 2, "committed", "ab" * 16),
        kept=(1, 2),
        last_seq=9,
        profile="raspberry-pi-5",
        arch="aarch64",
        agent_version="0.1.0",
    ),
    m.Telemetry(
        device_id="d1",
        ts=2.0,
        window_s=10.0,
        cpu_percent=12.5,
        memory_percent=40.0,
        rss_bytes=123,
        disk_free_bytes=10**9,
        requests=100,
        errors=1,
        latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.5},
        temperature_c=51.2,
        model=m.ActiveModel("digits", 2, "probation"),
    ),
    m.Event(
        device_id="d1",
        ts=3.0,
        event_id="e1",
        kind="lifecycle.rolled_back",
        severity="warning",
        message="NaN in output",
        code="health_check",
        deployment_id="dep1",
        model=m.ModelRef("digits", 3),
        data={"reason": "nan", "check": "finite"},
    ),
    m.ChunkRequest(device_id="d1", artifact_id="ab" * 16, ranges=((0, 10), (12, 13)), ts=4.0, reason="resume"),
    m.EnrollRequest(
        device_id="d1",
        public_key=bytes(range(32)),
        profile="jetson-orin-nano",
        ts=5.0,
        agent_version="0.1.0",
        arch="aarch64",
    ),
]


@pytest.mark.parametrize("msg", UP, ids=lambda x: x.type)
def test_up_messages_round_trip(msg) -> None:  # type: ignore[no-untyped-def]
    assert m.decode_up(m.encode(msg), msg.type) == msg
    assert m.decode_up(m.encode(msg)) == msg


@pytest.mark.parametrize("msg", UP, ids=lambda x: x.type)
def test_unknown_fields_survive_a_round_trip(msg) -> None:  # type: ignore[no-untyped-def]
    obj = json.loads(m.encode(msg))
    obj["future_field"] = {"nested": [1, 2]}
    obj["schema"] = "1.7"  # a newer minor version is accepted
    decoded = m.decode_up(json.dumps(obj).encode())
    assert decoded.extra == {"future_field": {"nested": [1, 2]}}
    again = json.loads(m.encode(decoded))
    assert again["future_field"] == {"nested": [1, 2]}


@pytest.mark.parametrize("schema", ["2.0", "0.9", "10"])
def test_unknown_major_version_is_refused(schema: str) -> None:
    obj = json.loads(m.encode(UP[0]))
    obj["schema"] = schema
    with pytest.raises(UnsupportedVersionError):
        m.decode_up(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b"null",
        b"{",
        b"\xff\xfe",
        b'{"type":"state"}',
        b'{"schema":"1","type":"nope"}',
        b'{"schema":"x.y","type":"state"}',
        b'{"schema":"1.0","type":"telemetry","ts":NaN}',
    ],
)
def test_malformed_payloads_are_typed_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode_up(payload)


def test_field_errors_name_the_field() -> None:
    obj = json.loads(m.encode(UP[1]))
    obj["requests"] = "many"
    with pytest.raises(MalformedMessageError) as err:
        m.decode_up(json.dumps(obj).encode())
    assert err.value.field == "requests"
    obj["requests"] = True  # booleans are not integers
    with pytest.raises(MalformedMessageError):
        m.decode_up(json.dumps(obj).encode())


def test_size_is_capped_before_parsing() -> None:
    huge = b'{"schema":"1.0","type":"telemetry","pad":"' + b"x" * (m.LIMITS["telemetry"]) + b'"}'
    with pytest.raises(MessageTooLargeError) as err:
        m.decode_up(huge, "telemetry")
    assert err.value.limit == m.LIMITS["telemetry"]


def test_type_must_match_the_topic() -> None:
    with pytest.raises(MalformedMessageError):
        m.decode_up(m.encode(UP[0]), "telemetry")


def test_chunk_request_ranges_are_validated() -> None:
    for bad in ([[5, 5]], [[-1, 3]], [[0, 2**21]], [[0]], [[True, 2]], [["0", "1"]]):
        obj = json.loads(m.encode(UP[3]))
        obj["ranges"] = bad
        with pytest.raises(MalformedMessageError):
            m.decode_up(json.dumps(obj).encode())
    obj = json.loads(m.encode(UP[3]))
    obj["ranges"] = [[i, i + 1] for i in range(0, 2 * (m.MAX_RANGES + 1), 2)]
    with pytest.raises(MalformedMessageError):
        m.decode_up(json.dumps(obj).encode())


def test_artifact_geometry_must_be_consistent() -> None:
    info = m.ArtifactInfo("ab" * 16, 100, "00" * 32, "none", 5000, "11" * 32, 1024, 5)
    assert m.ArtifactInfo.from_dict(info.to_dict()) == info
    bad = info.to_dict() | {"chunk_count": 4}
    with pytest.raises(MalformedMessageError):
        m.ArtifactInfo.from_dict(bad)


def test_deploy_needs_its_parts() -> None:
    obj = {
        "schema": "1.0",
        "type": "desired",
        "device_id": "d",
        "seq": 1,
        "issued_at": 0,
        "expires_at": 1,
        "action": "deploy",
        "model": {"name": "x", "version": 1},
    }
    with pytest.raises(MalformedMessageError):
        m.DesiredState.from_dict(obj)
    pin = m.DesiredState.from_dict(obj | {"action": "pin"})
    assert pin.artifact is None


def test_base64_must_be_canonical() -> None:
    assert m.strict_b64decode("AAE=") == b"\x00\x01"
    assert m.strict_b64decode("AAF=") is None  # same bytes with a padding bit set
    assert m.strict_b64decode("AA E=") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_escape_the_error_tree(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode_up(payload)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(["state", "telemetry", "event", "chunk_request", "enroll"]),
)
def test_arbitrary_json_never_escapes_the_error_tree(value, kind: str) -> None:  # type: ignore[no-untyped-def]
    obj = value if not isinstance(value, dict) else {"schema": "1.0", "type": kind, **value}
    with contextlib.suppress(ProtocolError):
        m.decode_up(json.dumps(obj).encode())


def test_a_lone_surrogate_escape_is_refused_and_a_pair_is_text() -> None:
    """JSON can escape half a UTF-16 pair; Python decodes it into a str no UTF-8 writer accepts (the server's
    SQLite raised on such a lifecycle string and the whole ingest batch was lost: found by the fuzz suite)."""
    report = m.StateReport("dev-1", True, 1, 1.0, lifecycle="idle")
    good = json.loads(m.encode(report))
    for where in ("lifecycle", "agent_version"):
        bad = {**good, where: "x\ud8c8y"}
        with pytest.raises(MalformedMessageError, match="lone surrogate"):
            m.decode_up(json.dumps(bad).encode(), "state")  # json.dumps writes it as the escape \\ud8c8
    with pytest.raises(MalformedMessageError, match="lone surrogate"):
        m.decode_up(json.dumps({**good, "extra_key\udc00": 1}).encode(), "state")
    paired = m.decode_up(json.dumps({**good, "agent_version": "1.0 \U0001f600"}).encode(), "state")
    assert isinstance(paired, m.StateReport) and paired.agent_version == "1.0 \U0001f600"
