"""The agent as a real process against real mosquitto, real crypto and real ONNX models.

Each test drives one (or two) ``python -m agent run`` processes through the test server
(tests/support/servers/stub.py), then looks at what the device reported and what its local
HTTP API serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from agent.protocol.messages import ModelRef
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import AgentFactory, assert_serves, deploy_and_commit, deploy_digits
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

pytestmark = pytest.mark.broker


def test_deploy_v1_then_v2(fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    fleet.wait_state(agent.device_id, lambda s: s.online and s.lifecycle == "idle")
    birth = fleet.log(agent.device_id).states[-1]
    assert birth.active is None and birth.public_key and birth.arch

    deploy_and_commit(fleet, agent, models, 1)
    v1_logits = assert_serves(agent, models, wait_ready=True)
    kinds = fleet.kinds(agent.device_id)
    expected = [
        "desired.accepted",
        "download.started",
        "download.completed",
        "lifecycle.verifying",
        "lifecycle.staged",
        "lifecycle.warming",
        "lifecycle.probation",
        "lifecycle.committed",
    ]
    positions = [kinds.index(k) for k in expected]
    assert positions == sorted(positions), kinds

    states = fleet.log(agent.device_id).states
    seen = {s.lifecycle for s in states}
    assert {"idle", "downloading", "verifying", "staged", "warming", "probation"} <= seen, "one per transition"
    # after the birth, reports carry only what changes, and an unchanged report is not sent again
    last_birth = max(i for i, s in enumerate(states) if s.public_key is not None)
    after_birth = states[last_birth + 1 :]
    assert len(after_birth) >= 6 and all(s.public_key is None and s.profile is None for s in after_birth)
    said = [(s.lifecycle, s.active, s.target, s.kept, s.last_seq, s.desired_expires_at, s.session) for s in after_birth]
    assert all(said[i] != said[i + 1] for i in range(len(said) - 1)), "no report repeats the one before it"

    deploy_and_commit(fleet, agent, models, 2, "good_v2")
    v2_logits = assert_serves(agent, models)
    np.testing.assert_allclose(v1_logits, v2_logits, rtol=1e-5, atol=1e-5)
    state = fleet.log(agent.device_id).states[-1]
    assert state.active is not None
    assert (state.active.name, state.active.version, state.active.state) == ("digits", 2, "committed")
    assert state.kept == (1, 2)
    journal = agent.journal()
    assert journal is not None and journal.committed == ModelRef("digits", 2)
    assert journal.committed_versions == {"digits": 2}


# -- automatic rollback --------------------------------------------------------------------------------------------

BAD_VARIANTS = [
    # (model file, the check that must catch it)
    ("nan", "finite"),
    ("wrong_shape", "shape"),
    ("slow", "latency"),
]


def test_misbehaving_versions_are_rolled_back_and_reported(
    fleet: FleetServer, models: AgentModels, agent_v1: AgentProcess
) -> None:
    agent = agent_v1
    agent.wait_http_ready()
    for version, (which, check) in enumerate(BAD_VARIANTS, start=2):
        mark = fleet.event_count(agent.device_id)
        desired = fleet.deploy(
            agent.device_id,
            models.bytes_of(which),
            agent_models.ref(version),
            runtime=agent_models.ONNX,
            health=models.health(),
        )
        event = fleet.wait_event(
            agent.device_id,
            lambda e: (
                e.kind.startswith("lifecycle.")
                and e.kind in ("lifecycle.rolled_back", "lifecycle.committed", "lifecycle.failed")
            ),
            after=mark,
        )
        assert event.kind == "lifecycle.rolled_back", (which, event)
        assert event.model == agent_models.ref(version)
        assert event.deployment_id == desired.deployment_id
        assert event.severity == "error"
        assert event.data["check"] == check, event.data
        assert event.data["phase"] == "warming"
        assert event.data["restored"] == {"name": "digits", "version": 1}
        assert event.data["reason"]
        assert "lifecycle.probation" not in fleet.kinds(agent.device_id, mark), "a bad model must never serve"
        state = fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle")
        assert state.active is not None and (state.active.version, state.active.state) == (1, "committed")
        assert_serves(agent, models)
    # nothing of the bad versions is left on disk; v1 is still the only kept version
    assert fleet.log(agent.device_id).states[-1].kept == (1,)
    versions = sorted(p.name.split("-")[0] for p in (agent.store_dir / "models" / "digits").iterdir())
    assert versions == ["1"]


def test_probation_error_rate_rolls_back_under_real_traffic(
    fleet: FleetServer, models: AgentModels, agent_v1: AgentProcess
) -> None:
    """A v2 that passes warm-up (probe inputs in [0, 1)) but fails on real pixels (0..16) during probation."""
    agent = agent_v1
    agent.wait_http_ready()
    stop = threading.Event()
    statuses: list[int] = []

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            x = models.samples[i % len(models.samples)][None]
            statuses.append(agent.infer(agent_models.NAME, models.input_name, x)[0])
            i += 1

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        mark = fleet.event_count(agent.device_id)
        deploy_digits(fleet, agent, models, 2, "fails_on_real_data",
                      health=models.health(probation_s=30.0, min_requests=10))
        event = fleet.wait_event(agent.device_id, "lifecycle.rolled_back", after=mark, timeout=60)
    finally:
        stop.set()
        worker.join(10)
    assert event.data["phase"] == "probation"
    assert event.data["check"] == "error_rate"
    assert "lifecycle.probation" in fleet.kinds(agent.device_id, mark)
    assert fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle").active.version == 1  # type: ignore[union-attr]
    assert 500 in statuses, "v2 really served (and failed) real requests before the rollback"
    assert_serves(agent, models)


# -- operator switches without any download ----------------------------------------------------------------------------


def test_rollback_activate_and_pin_need_no_chunks(
    fleet: FleetServer, models: AgentModels, agent_v2: AgentProcess
) -> None:
    agent = agent_v2
    fleet.serve_chunks = False  # from here on the broker carries no chunks at all
    sent = fleet.chunks_sent

    mark = fleet.event_count(agent.device_id)
    command_id = fleet.command(agent.device_id, "rollback")
    result = fleet.wait_event(agent.device_id, lambda e: e.kind == "command.result" and e.command_id == command_id)
    assert result.data["ok"] is True, result.data
    assert result.data["action"] == "rollback"
    assert result.data["active"] == {"name": "digits", "version": 1}
    state = fleet.wait_state(
        agent.device_id, lambda s: s.lifecycle == "idle" and s.active is not None and s.active.version == 1
    )
    assert state.lifecycle == "idle" and state.kept == (1, 2)
    assert "lifecycle.committed" in fleet.kinds(agent.device_id, mark)
    assert_serves(agent, models, wait_ready=True)

    # forwards again to the kept v2 (warm-up + probation apply), then a retained pin back to v1
    command_id = fleet.command(agent.device_id, "activate", version=2)
    result = fleet.wait_event(agent.device_id, lambda e: e.kind == "command.result" and e.command_id == command_id)
    assert result.data["ok"] is True, result.data
    fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle" and s.active.version == 2)  # type: ignore[union-attr]
    fleet.pin(agent.device_id, agent_models.ref(1))
    fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle" and s.active.version == 1)  # type: ignore[union-attr]

    # a version that is not kept is refused, and v1 keeps serving
    command_id = fleet.command(agent.device_id, "rollback", version=7)
    result = fleet.wait_event(agent.device_id, lambda e: e.kind == "command.result" and e.command_id == command_id)
    assert result.data["ok"] is False and "not kept" in result.data["message"]
    assert fleet.chunks_sent == sent
    assert all(r.ts < time.time() for r in fleet.log(agent.device_id).chunk_requests)
    journal = agent.journal()
    assert journal is not None and journal.committed == agent_models.ref(1)
    assert_serves(agent, models)


def test_ping_purge_and_status(fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory) -> None:
    agent = agent_factory(settings={"models": {"keep_versions": 2}})
    for version, which in ((1, "good"), (2, "good_v2"), (3, "good")):
        deploy_and_commit(fleet, agent, models, version, which)
    state = fleet.log(agent.device_id).states[-1]
    assert state.kept == (2, 3), "keep_versions = 2 prunes the oldest"
    ping = fleet.command(agent.device_id, "ping")
    pong = fleet.wait_event(agent.device_id, lambda e: e.command_id == ping)
    assert pong.data == {"ok": True, "action": "ping", "active": {"name": "digits", "version": 3}, "message": "pong"}
    purge = fleet.command(agent.device_id, "purge")
    result = fleet.wait_event(agent.device_id, lambda e: e.command_id == purge)
    assert result.data["ok"] is True
    fleet.wait_state(agent.device_id, lambda s: s.kept == (3,))

    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(agent.config_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert status["running"] is True
    assert status["lifecycle"] == "idle"
    assert status["committed"] == {"name": "digits", "version": 3}
    assert [k["version"] for k in status["kept"]] == [3]
    assert status["local_api"]["ready"] is True
    assert status["local_api"]["model"]["versions"] == ["3"], "the live view of the running agent"
    table = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "digits v3 (committed)" in table and "running (pid" in table
