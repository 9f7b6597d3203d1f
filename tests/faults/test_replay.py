"""Replay, downgrade, expiry and freeze, against a real agent process (and the real server's status view).

Old but authentic manifests and commands are refused (``replay``), a lower version than the
committed one without a signed rollback is refused (``downgrade``), an expired manifest or
command is refused (``expired``); a server that stops sending fresh desired states (freeze) shows
in ``edgefleet-agent status``, in a ``desired.expired`` event and in the server's fleet status.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.protocol.envelope import seal_command
from agent.protocol.messages import Command
from agent.protocol.topics import Channel, device_topic
from tests.faults.helpers import agent_status, intact, register_on
from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, fleet, models
from tests.support.faults import FaultLedger, read_journal
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.fleet import Fleet
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def test_old_manifests_and_commands_resent(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    agent = agent_factory(prefix="replay")
    device = agent.device_id
    health = models.health(probation_s=0.3)
    mark = fleet.event_count(device)
    first = fleet.desired_deploy(device, fleet.seal(models.bytes_of("good")), agent_models.ref(1),
                                 runtime=agent_models.ONNX, health=health)
    v1_blob = fleet.publish_desired(first)  # authentic; kept to re-send later
    assert fleet.wait_event(device, "lifecycle.committed", after=mark, timeout=60).model == agent_models.ref(1)
    deploy_and_commit(fleet, agent, models, 2, "good_v2", probation_s=0.3)
    topic = device_topic(device, Channel.DESIRED)

    # 1. the old v1 manifest, authentic, re-sent: its seq is below the last accepted one
    mark = fleet.event_count(device)
    fleet.publish_raw(topic, v1_blob, retain=True)
    assert fleet.wait_event(device, "desired.rejected", after=mark).code == "replay"
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)

    # 2. a fresh seq asking for v1 as a deploy: a downgrade without a signed rollback
    mark = fleet.event_count(device)
    fleet.deploy(device, models.bytes_of("good"), agent_models.ref(1), runtime=agent_models.ONNX, health=health)
    event = fleet.wait_event(device, "desired.rejected", after=mark)
    assert event.code == "downgrade" and "1" in event.message
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)

    # 3. an expired manifest (beyond the clock-skew allowance) and an expired command
    mark = fleet.event_count(device)
    fleet.deploy(device, models.bytes_of("good_v2"), agent_models.ref(3), runtime=agent_models.ONNX, health=health,
                 expires_in=-3600)
    assert fleet.wait_event(device, "desired.rejected", after=mark).code == "expired"
    mark = fleet.event_count(device)
    now = time.time()
    stale = Command(device, fleet.next_seq(device), now - 7200, now - 3600, "rb-old", "rollback")
    fleet.publish_raw(device_topic(device, Channel.COMMAND), seal_command(stale, fleet.signing_key))
    assert fleet.wait_event(device, "error.expired", after=mark).code == "expired"
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)

    # 4. a signed rollback is obeyed once; the same command blob re-sent is a replay (no second switch)
    command = Command(device, fleet.next_seq(device), time.time(), time.time() + 300, "rb-1", "rollback",
                      model=agent_models.NAME, version=1)
    blob = seal_command(command, fleet.signing_key)
    mark = fleet.event_count(device)
    fleet.publish_raw(device_topic(device, Channel.COMMAND), blob)
    result = fleet.wait_event(device, "command.result", after=mark)
    assert result.data["ok"], result.message
    intact(fleet, agent, models, 1, kept={1, 2}, ledger=ledger)
    mark = fleet.event_count(device)
    fleet.publish_raw(device_topic(device, Channel.COMMAND), blob)
    assert fleet.wait_event(device, "error.replay", after=mark).code == "replay"
    assert not [e for e in fleet.log(device).events[mark:] if e.kind == "command.result"]
    intact(fleet, agent, models, 1, kept={1, 2}, ledger=ledger)

    # 5. a kill -9 and restart: the replay counter is persisted, the agent acts on nothing old
    agent.kill()
    agent.start()
    intact(fleet, agent, models, 1, kept={1, 2}, ledger=ledger)
    journal = read_journal(agent.store_dir)
    assert journal is not None and journal.last_seq >= command.seq, "the replay counter survived the restart"


def test_replay_refused_after_both_journal_slots_are_lost(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """Both journal slots gone (one deleted, one torn): the seq.floor backup still refuses an old signed rollback."""
    agent = agent_factory(prefix="floor")
    device = agent.device_id
    deploy_and_commit(fleet, agent, models, 1, "good", probation_s=0.3)
    deploy_and_commit(fleet, agent, models, 2, "good_v2", probation_s=0.3)
    topic = device_topic(device, Channel.COMMAND)

    def obey(action: str, version: int, command_id: str) -> bytes:
        cmd = Command(device, fleet.next_seq(device), time.time(), time.time() + 600, command_id, action,
                      model=agent_models.NAME, version=version)
        blob = seal_command(cmd, fleet.signing_key)
        mark = fleet.event_count(device)
        fleet.publish_raw(topic, blob)
        result = fleet.wait_event(device, lambda e: (e.kind == "command.result" and e.command_id == command_id)
                                  or e.kind.startswith("error."), after=mark, timeout=60)
        assert result.kind == "command.result" and result.data["ok"], f"{result.kind}: {result.message}"
        fleet.wait_state(device, lambda s, v=version: s.lifecycle == "idle" and s.active is not None
                         and s.active.version == v, timeout=60)
        return blob

    old_rollback = obey("rollback", 1, "rb-floor")  # authentic, obeyed once
    obey("activate", 2, "act-floor")  # a newer seq than the rollback, and newer than any desired state
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)
    floor = agent.journal()
    assert floor is not None and floor.last_seq > 0

    agent.kill()
    store: Path = agent.store_dir
    (store / "journal.0").unlink(missing_ok=True)  # one slot lost ...
    if (store / "journal.1").exists():  # ... and the other torn mid-write
        data = (store / "journal.1").read_bytes()
        (store / "journal.1").write_bytes(data[: len(data) // 2])
    else:
        (store / "journal.1").write_bytes(b"EFJ1 torn")
    assert read_journal(store) is None, "the journal must be unreadable for this test to mean anything"
    mark = fleet.event_count(device)
    agent.start()
    fleet.wait_state(device, lambda s: s.online and s.lifecycle == "idle" and s.active is not None
                     and s.active.version == 2, timeout=60)
    fleet.publish_raw(topic, old_rollback)  # the replay: valid signature, old seq
    assert fleet.wait_event(device, "error.replay", after=mark, timeout=30).code == "replay"
    # a later command on the same topic from the same publisher is handled after the replay: once it is
    # answered, the replay was handled too (refused, or it would have answered first)
    ping = fleet.command(device, "ping")
    fleet.wait_event(device, lambda e: e.kind == "command.result" and e.command_id == ping, after=mark, timeout=30)
    assert not [e for e in fleet.log(device).events[mark:] if e.kind == "command.result" and e.command_id != ping]
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)
    rebuilt = read_journal(store)
    assert rebuilt is not None and rebuilt.last_seq >= floor.last_seq, "the floor went back into the journal"



def test_freeze_is_visible_on_the_device_and_in_server_status(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, real_server: Fleet, ledger: FaultLedger
) -> None:
    """The server stops re-signing: the device's desired state expires; the agent says so, and so does the server."""
    agent = agent_factory(prefix="freeze", settings={"profile": "x86-64-avx2"})
    device = agent.device_id
    register_on(real_server, fleet, agent, "x86-64-avx2")
    mark = fleet.event_count(device)
    desired = fleet.deploy(device, models.bytes_of("good"), agent_models.ref(1), runtime=agent_models.ONNX,
                           health=models.health(probation_s=0.2), expires_in=8.0)
    fleet.wait_event(device, "lifecycle.committed", after=mark, timeout=60)
    status = agent_status(agent)
    if time.time() < desired.expires_at - 1.0:  # on a loaded machine the commit may outlast the short expiry
        assert status["desired_expired"] is False and status["desired_expires_at"] == desired.expires_at
        assert not _server_row(real_server, device)["stale"]
    # ... and then nothing: no fresh desired state before expires_at
    event = fleet.wait_event(device, "desired.expired", after=mark, timeout=30)
    assert event.code == "expired" and "freeze" in event.message
    status = agent_status(agent)
    assert status["desired_expired"] is True
    agent.wait_until(lambda: bool(_server_row(real_server, device)["stale"]),
                     "the server's status flags the frozen device as stale")
    intact(fleet, agent, models, 1, ledger=ledger)  # a freeze never stops the committed model


def _server_row(f: Fleet, device: str) -> dict[str, object]:
    return next(r for r in f.service.list_devices() if r["device_id"] == device)
