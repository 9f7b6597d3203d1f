"""Bad input never costs the device its model: each fault is refused with a clear event and v1 keeps serving.

Bad signatures, replays (desired and command), downgrades, expired manifests, wrong recipients,
garbage, tampered chunks, a full disk; plus the quiet case: the retained desired state
re-delivered on every reconnect is ignored without an event.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.envelope import seal_command, seal_desired
from agent.protocol.messages import Command
from agent.protocol.topics import Channel, device_topic
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import AgentFactory, assert_serves, deploy_and_commit, deploy_digits, serving_v1
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

pytestmark = pytest.mark.broker


def still_serving(fleet: FleetServer, agent: AgentProcess, models: AgentModels, version: int) -> None:
    state = fleet.wait_state(
        agent.device_id,
        lambda s: s.online and s.lifecycle == "idle" and s.active is not None and s.active.version == version,
    )
    assert state.active is not None and state.active.state == "committed"
    assert agent.running
    assert_serves(agent, models)


def rejected(fleet: FleetServer, agent: AgentProcess, mark: int, kind: str = "desired.rejected") -> str | None:
    return fleet.wait_event(agent.device_id, kind, after=mark).code


def test_refused_desired_states_and_commands_keep_v1_serving(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = serving_v1(agent_factory, fleet, models)
    device = agent.device_id
    deploy_and_commit(fleet, agent, models, 2, "good_v2")
    agent.wait_http_ready()
    health = models.health()

    # a forged signature (a key the device does not trust)
    mark = fleet.event_count(device)
    forged = fleet.desired_deploy(
        device, fleet.seal(models.bytes_of("nan")), agent_models.ref(9), runtime=agent_models.ONNX, health=health
    )
    fleet.publish_desired(forged, signing_key=Ed25519PrivateKey.generate())
    assert rejected(fleet, agent, mark) == "bad_signature"

    # a replay: an authentic but older desired state (seq below the last accepted)
    mark = fleet.event_count(device)
    old = fleet.desired_deploy(
        device,
        fleet.seal(models.bytes_of("good")),
        agent_models.ref(3),
        runtime=agent_models.ONNX,
        health=health,
        seq=1,
    )
    fleet.publish_desired(old)
    assert rejected(fleet, agent, mark) == "replay"

    # a downgrade: fresh seq, authentic, but older than the committed version
    mark = fleet.event_count(device)
    fleet.deploy(device, models.bytes_of("good"), agent_models.ref(1), runtime=agent_models.ONNX, health=health)
    assert rejected(fleet, agent, mark) == "downgrade"

    # an expired manifest (beyond the 300 s clock-skew allowance)
    mark = fleet.event_count(device)
    fleet.deploy(
        device, models.bytes_of("good"), agent_models.ref(5), runtime=agent_models.ONNX, health=health, expires_in=-3600
    )
    assert rejected(fleet, agent, mark) == "expired"

    # addressed to another device, on this device's topic
    mark = fleet.event_count(device)
    fleet.enroll("someone-else", fleet.log(device).public_key)  # type: ignore[arg-type]
    stolen = fleet.desired_deploy(
        "someone-else",
        fleet.seal(models.bytes_of("good")),
        agent_models.ref(6),
        runtime=agent_models.ONNX,
        health=health,
    )
    fleet.publish_raw(device_topic(device, Channel.DESIRED), seal_desired(stolen, fleet.signing_key), retain=True)
    assert rejected(fleet, agent, mark) == "wrong_recipient"

    # garbage
    mark = fleet.event_count(device)
    fleet.publish_raw(device_topic(device, Channel.DESIRED), b"\x00not json at all", retain=True)
    assert rejected(fleet, agent, mark) == "malformed"

    # a replayed command (the same signed blob twice) and a forged one
    mark = fleet.event_count(device)
    command = Command(device, fleet.next_seq(device), time.time(), time.time() + 300, "ping-1", "ping")
    blob = seal_command(command, fleet.signing_key)
    fleet.publish_raw(device_topic(device, Channel.COMMAND), blob)
    assert fleet.wait_event(device, "command.result", after=mark).command_id == "ping-1"
    mark = fleet.event_count(device)
    fleet.publish_raw(device_topic(device, Channel.COMMAND), blob)
    assert rejected(fleet, agent, mark, "error.replay") == "replay"
    mark = fleet.event_count(device)
    forged_cmd = Command(device, fleet.next_seq(device), time.time(), time.time() + 300, "rb-1", "rollback")
    fleet.publish_raw(device_topic(device, Channel.COMMAND), seal_command(forged_cmd, Ed25519PrivateKey.generate()))
    assert rejected(fleet, agent, mark, "error.bad_signature") == "bad_signature"

    still_serving(fleet, agent, models, 2)
    assert not [e for e in fleet.log(device).events if e.kind == "command.result" and e.command_id == "rb-1"]
    journal = agent.journal()
    assert journal is not None and journal.committed == agent_models.ref(2)


def test_tampered_chunks_are_dropped_and_fetched_again(
    fleet: FleetServer, models: AgentModels, agent_v1: AgentProcess
) -> None:
    agent = agent_v1
    tampered: set[int] = set()

    def flip_first_copy(index: int, chunk: bytes) -> bytes:
        if index in tampered:
            return chunk
        tampered.add(index)
        corrupt = bytearray(chunk)
        corrupt[-20] ^= 0x40  # inside the ciphertext: the AEAD tag no longer matches
        return bytes(corrupt)

    fleet.tamper = flip_first_copy
    mark = fleet.event_count(agent.device_id)
    deploy_and_commit(fleet, agent, models, 2, "good_v2", chunk_size=4096)
    fleet.tamper = None
    kinds = fleet.kinds(agent.device_id, mark)
    assert "error.decrypt" in kinds
    assert kinds.count("error.decrypt") <= 5 * 4, "error events are rate-limited"
    retries = [r for r in fleet.log(agent.device_id).chunk_requests if r.reason == "retry"]
    assert retries, "missing chunks were asked for again"
    assert_serves(agent, models)


def test_full_disk_fails_the_update_not_the_device(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    """The store keeps a free-space floor; an update that would cross it fails cleanly."""
    agent = agent_factory(settings={"models": {"min_free_bytes": 1 << 50}})  # more than any disk has
    mark = fleet.event_count(agent.device_id)
    deploy_digits(fleet, agent, models, 1)
    failed = fleet.wait_event(agent.device_id, "lifecycle.failed", after=mark)
    assert failed.code == "disk_full"
    assert "free" in failed.message
    state = fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle")
    assert state.active is None
    assert not list((agent.store_dir / "partial").iterdir()), "the partial download was cleaned up"


def test_retained_desired_is_not_reprocessed_on_restart(
    fleet: FleetServer, models: AgentModels, agent_v1: AgentProcess
) -> None:
    agent = agent_v1
    agent.stop()
    mark = fleet.event_count(agent.device_id)
    agent.start()
    fleet.wait_state(agent.device_id, lambda s: s.online and s.active is not None and s.active.version == 1)
    agent.wait_http_ready()
    # the broker re-delivers the retained desired state when the agent subscribes, before its birth report;
    # a command sent now is handled after it, so once it is answered the desired state was handled too
    ping = fleet.command(agent.device_id, "ping")
    fleet.wait_event(agent.device_id, lambda e: e.kind == "command.result" and e.command_id == ping, after=mark)
    kinds = fleet.kinds(agent.device_id, mark)
    assert not [k for k in kinds if k.startswith(("desired.", "download.", "lifecycle."))], kinds
    assert_serves(agent, models)


def test_corrupted_committed_model_falls_back_to_a_kept_version(
    fleet: FleetServer, models: AgentModels, agent_v2: AgentProcess
) -> None:
    """Bit rot in the committed model file (found by its digest at start): serve the previous kept version."""
    agent = agent_v2
    agent.stop()
    (current,) = [p for p in (agent.store_dir / "models" / "digits").iterdir() if p.name.startswith("2-")]
    model_file = current / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    mark = fleet.event_count(agent.device_id)
    agent.start()
    event = fleet.wait_event(agent.device_id, "lifecycle.rolled_back", after=mark)
    assert event.model == agent_models.ref(2)
    assert event.data["phase"] == "startup" and event.data["restored"] == {"name": "digits", "version": 1}
    assert "changed on disk" in event.message
    still_serving(fleet, agent, models, 1)
    journal = agent.journal()
    assert journal is not None and journal.committed == agent_models.ref(1)
    assert journal.committed_versions == {"digits": 1}, "v2 may be deployed again once it is fixed"
