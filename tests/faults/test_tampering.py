"""Tampering, field by field, against a real agent process on a real mosquitto with the real digits model.

Every altered manifest, command, wrapped key and chunk is refused with a clear event; nothing
tampered is ever stored or served; the committed model keeps answering real inference and no
kept version disappears. (The exhaustive bit-level sweep of the same fields, without processes,
is tests/unit/protocol/test_properties.py.)
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol.envelope import CHUNK_HEADER_SIZE, seal_command, seal_desired, wrap_key
from agent.protocol.messages import Command, WrappedKey
from agent.protocol.topics import Channel, device_topic
from tests.faults.helpers import edit_payload, flip, intact
from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, fleet, models, serving_v1
from tests.support.faults import FaultLedger, read_journal
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker

#: manifest field -> an edit of the signed payload (the signature is left as it was)
MANIFEST_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "device_id": lambda p: p.update(device_id=p["device_id"] + "x"),
    "seq": lambda p: p.update(seq=p["seq"] + 1000),
    "issued_at": lambda p: p.update(issued_at=p["issued_at"] - 1),
    "expires_at": lambda p: p.update(expires_at=p["expires_at"] + 10 * 365 * 86400),
    "action": lambda p: p.update(action="pin"),
    "model.version": lambda p: p["model"].update(version=p["model"]["version"] + 100),
    "model.name": lambda p: p["model"].update(name="other"),
    "artifact.sha256": lambda p: p["artifact"].update(sha256="0" * 64),
    "artifact.size": lambda p: p["artifact"].update(size=p["artifact"]["size"] + 1),
    "artifact.chunk_size": lambda p: p["artifact"].update(chunk_size=p["artifact"]["chunk_size"] * 2),
    "key.epk": lambda p: p["key"].update(epk=p["key"]["epk"][::-1]),
    "health.latency_budget_ms": lambda p: p["health"].update(latency_budget_ms=1e9),
    "runtime.format": lambda p: p["runtime"].update(format="tflite"),
}


def test_manifest_and_command_fields(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    agent = serving_v1(agent_factory, fleet, models, prefix="tamper-m")
    device = agent.device_id
    seq_before = read_journal(agent.store_dir).last_seq  # type: ignore[union-attr]
    desired = fleet.desired_deploy(
        device, fleet.seal(models.bytes_of("good_v2")), agent_models.ref(2), runtime=agent_models.ONNX,
        health=models.health(),
    )
    blob = seal_desired(desired, fleet.signing_key)
    env = json.loads(blob)
    cases: dict[str, tuple[bytes, str]] = {
        f"manifest.{name}": (edit_payload(blob, edit), "bad_signature") for name, edit in MANIFEST_EDITS.items()
    }
    cases["manifest.signature"] = (
        json.dumps(env | {"signatures": [{**env["signatures"][0], "sig": env["signatures"][0]["sig"][::-1]}]}).encode(),
        "bad_signature",
    )
    cases["manifest.keyid"] = (
        json.dumps(env | {"signatures": [{**env["signatures"][0], "keyid": "00" * 8}]}).encode(), "bad_signature"
    )
    cases["manifest.payloadType"] = (json.dumps(env | {"payloadType": "text/plain"}).encode(), "malformed")
    cases["manifest.truncated"] = (blob[: len(blob) // 2], "malformed")
    cases["manifest.foreign_key"] = (seal_desired(desired, Ed25519PrivateKey.generate()), "bad_signature")
    topic = device_topic(device, Channel.DESIRED)
    for name, (payload, code) in cases.items():
        mark = fleet.event_count(device)
        fleet.publish_raw(topic, payload, retain=True)
        event = fleet.wait_event(device, "desired.rejected", after=mark)
        assert event.code == code, f"{name}: {event.code} {event.message}"
        assert event.message, name
        ledger.trial()

    command = Command(device, fleet.next_seq(device), time.time(), time.time() + 300, "rb-x", "rollback")
    cblob = seal_command(command, fleet.signing_key)
    command_cases = {
        "command.action": edit_payload(cblob, lambda p: p.update(action="purge")),
        "command.version": edit_payload(cblob, lambda p: p.update(version=0)),
        "command.device_id": edit_payload(cblob, lambda p: p.update(device_id="someone-else")),
        "command.foreign_key": seal_command(command, Ed25519PrivateKey.generate()),
    }
    for name, payload in command_cases.items():
        mark = fleet.event_count(device)
        fleet.publish_raw(device_topic(device, Channel.COMMAND), payload)
        event = fleet.wait_event(device, lambda e: e.kind.startswith("error."), after=mark)
        assert event.code == "bad_signature", f"{name}: {event.code}"
        ledger.trial()
    journal = read_journal(agent.store_dir)
    assert journal is not None and journal.last_seq == seq_before, "a tampered message moved the replay counter"
    assert not [e for e in fleet.log(device).events if e.kind == "command.result" and e.command_id == "rb-x"]
    intact(fleet, agent, models, 1)


def test_wrapped_key(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """A signed manifest whose wrapped key was altered (or wrapped for another device) fails the unwrap, cleanly."""
    agent = serving_v1(agent_factory, fleet, models, prefix="tamper-k")
    device = agent.device_id
    public = fleet.log(device).public_key
    assert public is not None

    def variants(artifact: Any) -> dict[str, WrappedKey]:
        good = wrap_key(artifact.data_key, public, artifact_id=artifact.info.artifact_id, device_id=device)
        return {
            "ct": WrappedKey(epk=good.epk, ciphertext=flip(good.ciphertext, 3)),
            "tag": WrappedKey(epk=good.epk, ciphertext=flip(good.ciphertext, len(good.ciphertext) - 1)),
            "epk": WrappedKey(epk=flip(good.epk, 0), ciphertext=good.ciphertext),
            "truncated": WrappedKey(epk=good.epk, ciphertext=good.ciphertext[:32] + bytes(16)),
            "other_device": wrap_key(
                artifact.data_key, public, artifact_id=artifact.info.artifact_id, device_id="other-device"
            ),
            "other_device_key": wrap_key(
                artifact.data_key, X25519PrivateKey.generate().public_key(), artifact_id=artifact.info.artifact_id,
                device_id=device,
            ),
        }

    for name in variants(fleet.seal(models.bytes_of("good_v2"))):
        artifact = fleet.seal(models.bytes_of("good_v2"))
        desired = fleet.desired_deploy(
            device, artifact, agent_models.ref(2), runtime=agent_models.ONNX, health=models.health()
        )
        desired = dataclasses.replace(desired, key=variants(artifact)[name])
        mark = fleet.event_count(device)
        fleet.publish_desired(desired)
        failed = fleet.wait_event(device, "lifecycle.failed", after=mark)
        assert failed.code == "key_unwrap", f"{name}: {failed.code} {failed.message}"
        assert "download.completed" not in fleet.kinds(device, mark)
        intact(fleet, agent, models, 1, ledger=ledger)
    assert not list((agent.store_dir / "partial").glob("*/data*")), "nothing of a refused artifact is kept"


def _chunk_tamperers() -> dict[str, Callable[[bytes], bytes]]:
    return {
        "magic": lambda c: flip(c, 0),
        "version": lambda c: flip(c, 4),
        "flags": lambda c: flip(c, 5),
        "artifact_id": lambda c: flip(c, 8),
        "index": lambda c: flip(c, 27),
        "count": lambda c: flip(c, 31),
        "length": lambda c: flip(c, 35),
        "body": lambda c: flip(c, CHUNK_HEADER_SIZE + 5),
        "tag": lambda c: flip(c, len(c) - 1),
        "truncated": lambda c: c[: len(c) - 7],
        "empty_body": lambda c: c[:CHUNK_HEADER_SIZE],
    }


def test_chunk_header_body_tag_and_truncation(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """The first copy of each chunk is altered in one field (round robin); only clean re-sent copies are stored."""
    agent = serving_v1(agent_factory, fleet, models, prefix="tamper-c")
    device = agent.device_id
    tamperers = list(_chunk_tamperers().items())
    seen: dict[int, str] = {}

    def tamper(index: int, chunk: bytes) -> bytes:
        if index in seen:
            return chunk
        name, how = tamperers[index % len(tamperers)]
        seen[index] = name
        return how(chunk)

    fleet.tamper = tamper
    mark = fleet.event_count(device)
    deploy_and_commit(fleet, agent, models, 2, "good_v2", chunk_size=1024)
    fleet.tamper = None
    used = set(seen.values())
    assert used == {n for n, _ in tamperers}, f"not every field was tampered: {sorted(used)}"
    codes = {e.code for e in fleet.log(device).events[mark:] if e.kind.startswith("error.")}
    assert codes & {"decrypt", "malformed", "integrity", "chunk_out_of_range", "unsupported_version"}, codes
    for _ in used:
        ledger.trial()
    intact(fleet, agent, models, 2, kept={1, 2})


def test_chunks_spliced_from_another_artifact_or_device(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """Chunks of another artifact, or of the same model sealed for another device, never enter a download."""
    agent = agent_factory(prefix="tamper-s")
    other = agent_factory(prefix="tamper-o")
    device = agent.device_id
    deploy_and_commit(fleet, agent, models, 1)
    deploy_and_commit(fleet, other, models, 1)
    foreign = fleet.seal(models.bytes_of("good_v2"), chunk_size=2048)  # another artifact (another key)
    for_other = fleet.seal(models.bytes_of("good_v2"), chunk_size=2048)  # what the other device was sent
    fleet.publish_desired(fleet.desired_deploy(
        other.device_id, for_other, agent_models.ref(2), runtime=agent_models.ONNX, health=models.health()
    ))
    fleet.serve_chunks = False
    mine = fleet.seal(models.bytes_of("good_v2"), chunk_size=2048)
    mark = fleet.event_count(device)
    fleet.publish_desired(fleet.desired_deploy(
        device, mine, agent_models.ref(2), runtime=agent_models.ONNX, health=models.health()
    ))
    fleet.wait_event(device, "download.started", after=mark)
    topic = device_topic(device, Channel.CHUNK, mine.info.artifact_id)
    my_header = mine.chunks[0][:CHUNK_HEADER_SIZE]
    injected = {
        "other_artifact_as_is": foreign.chunks[0],
        "other_artifact_spliced": my_header + foreign.chunks[0][CHUNK_HEADER_SIZE:],
        "other_device_spliced": my_header + for_other.chunks[0][CHUNK_HEADER_SIZE:],
        "reordered_index": mine.chunks[1][:CHUNK_HEADER_SIZE] + mine.chunks[0][CHUNK_HEADER_SIZE:],
    }
    for name, chunk in injected.items():
        before = fleet.event_count(device)
        fleet.publish_raw(topic, chunk)
        if name != "other_artifact_as_is":  # another artifact's own stream is just not ours: ignored quietly
            event = fleet.wait_event(device, lambda e: e.kind.startswith("error."), after=before)
            assert event.code in ("decrypt", "malformed"), f"{name}: {event.code}"
        ledger.trial()
    # the last injected chunk answered with an error event: the agent handled every one before it (in order)
    assert name != "other_artifact_as_is"
    state = fleet.log(device).states[-1]
    assert state.lifecycle == "downloading"
    progress = [e for e in fleet.log(device).events[mark:] if e.kind == "download.progress"]
    assert not progress, "a spliced chunk was counted as received"
    fleet.serve_chunks = True  # the agent's retry timer asks again; now the real chunks flow
    fleet.wait_event(device, "lifecycle.committed", after=mark, timeout=60)
    intact(fleet, agent, models, 2, kept={1, 2})
    fleet.wait_event(other.device_id, "lifecycle.committed", timeout=60)
    intact(fleet, other, models, 2, kept={1, 2})
