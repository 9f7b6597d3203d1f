"""The agent's MQTT behaviour: TLS + credentials, broker restarts, Last Will, retained state, telemetry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.broker import SERVER_USER, MosquittoBroker
from tests.conftest import SecureBrokerFactory
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import (
    AgentFactory,
    agent_factory,
    assert_serves,
    deploy_and_commit,
    deploy_digits,
    fleet,
    models,
)
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer, unique_device_id

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def test_tls_and_per_device_credentials(
    secure_broker: SecureBrokerFactory, models: AgentModels, tmp_path: Path
) -> None:
    device_id = unique_device_id("tls")
    broker, passwords = secure_broker([device_id])
    ca = secure_broker.tls.ca_cert
    server = FleetServer(broker.host, broker.port, username=SERVER_USER, password=passwords[SERVER_USER], ca_cert=ca)
    (tmp_path / "pw").write_text(passwords[device_id] + "\n")
    agent = AgentProcess(
        tmp_path,
        device_id,
        broker_host=broker.host,
        broker_port=broker.port,
        server=server,
        settings={
            "broker": {"tls": True, "ca_cert": str(ca), "username": device_id, "password_file": str(tmp_path / "pw")}
        },
    )
    try:
        agent.start()
        deploy_and_commit(server, agent, models, 1)
        assert_serves(agent, models, wait_ready=True)
        assert server.log(device_id).enrolls >= 1, "a new device announces itself on up/enroll"
    finally:
        agent.kill()
        server.close()


@pytest.fixture
def own_broker_fleet(fresh_broker: MosquittoBroker) -> Iterator[FleetServer]:
    server = FleetServer(fresh_broker.host, fresh_broker.port)
    yield server
    server.close()


def test_broker_restart_mid_download_resumes(
    fresh_broker: MosquittoBroker, own_broker_fleet: FleetServer, models: AgentModels, tmp_path: Path
) -> None:
    fleet = own_broker_fleet
    agent = AgentProcess.on(fresh_broker, fleet, tmp_path, "restart")
    try:
        agent.start()
        deploy_and_commit(fleet, agent, models, 1)
        fleet.chunk_limit = fleet.chunks_sent + 20  # the stream holds after 20 chunks: the broker dies mid-transfer
        mark = fleet.event_count(agent.device_id)
        deploy_digits(fleet, agent, models, 2, "good_v2", chunk_size=2048)
        held = fleet.chunk_limit
        fleet.wait_for(lambda: fleet.chunks_sent >= held and not fleet.streaming, timeout=60)
        fresh_broker.restart(kill=True)  # the broker dies mid-transfer and comes back (persistence on)
        fleet.chunk_limit = None  # the agent's next request is served in full
        done = fleet.wait_event(
            agent.device_id, lambda e: e.kind in ("lifecycle.committed", "lifecycle.failed"), after=mark, timeout=60
        )
        assert done.kind == "lifecycle.committed" and done.model == agent_models.ref(2)
        connections = [r for r in agent.log_records() if r.get("msg") == "connected"]
        assert len(connections) >= 2, "the agent reconnected to the restarted broker"
        assert connections[-1]["session"] > connections[0]["session"]
        assert agent.running
        assert_serves(agent, models)
    finally:
        agent.kill()


def test_last_will_marks_a_killed_agent_offline(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = agent_factory()
    birth = fleet.wait_state(agent.device_id, lambda s: s.online)
    agent.kill()
    will = fleet.wait_state(agent.device_id, lambda s: not s.online, timeout=30)
    assert will.session == birth.session, "the Will carries the session of the connection it belongs to"
    agent.start()
    reborn = fleet.wait_state(agent.device_id, lambda s: s.online)
    assert reborn.session > will.session, "sessions grow across restarts (a late Will cannot win)"
    agent.stop()
    farewell = fleet.wait_state(agent.device_id, lambda s: not s.online)
    assert farewell.session == reborn.session


def test_desired_state_published_while_offline_is_applied_on_connect(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(start=False)
    deploy_digits(fleet, agent, models, 1)  # retained, and acknowledged by the broker before deploy() returns
    agent.start()
    fleet.wait_state(
        agent.device_id, lambda s: s.lifecycle == "idle" and s.active is not None and s.active.version == 1
    )
    assert_serves(agent, models, wait_ready=True)


def test_shared_artifact_topic_and_telemetry(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = agent_factory()
    mark = fleet.event_count(agent.device_id)
    desired = deploy_digits(fleet, agent, models, 1, shared=True)
    assert desired.artifact is not None and desired.artifact.topic
    fleet.wait_event(agent.device_id, "lifecycle.committed", after=mark)
    agent.wait_http_ready()
    for _ in range(5):
        assert_serves(agent, models, samples=4)
    count = len(fleet.log(agent.device_id).telemetry)

    def busy_report() -> bool:
        return any(t.requests >= 5 for t in fleet.log(agent.device_id).telemetry[count:])

    fleet.wait_for(busy_report, timeout=10)
    t = next(t for t in fleet.log(agent.device_id).telemetry[count:] if t.requests >= 5)
    assert t.model is not None and (t.model.name, t.model.version) == ("digits", 1)
    assert t.errors == 0
    assert set(t.latency_ms) == {"p50", "p95", "p99"}
    assert 0 < t.latency_ms["p50"] <= t.latency_ms["p95"] <= t.latency_ms["p99"]
    assert t.rss_bytes > 10 << 20 and t.disk_free_bytes > 0
    assert 0 <= t.cpu_percent <= 100 and 0 < t.memory_percent <= 100
    assert t.arch and t.lifecycle == "idle"
