"""The agent measures what it installs: a real agent process, real mosquitto, a real ONNX model."""

from __future__ import annotations

import pytest

from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, fleet, models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def test_warm_up_benchmark_is_reported_per_build(fleet: FleetServer, models: AgentModels,
                                                 agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    fleet.wait_state(agent.device_id, lambda s: s.online and s.lifecycle == "idle")
    deploy_and_commit(fleet, agent, models, 1)
    log = fleet.log(agent.device_id)
    fleet.wait_for(lambda: any(m.source == "warmup" for m in log.measurements))
    m = next(m for m in log.measurements if m.source == "warmup")
    state = log.states[-1]
    assert (m.model, m.version, m.device_id) == ("digits", 1, agent.device_id)
    assert state.active is not None and m.artifact_id == state.active.artifact_id
    assert 1 <= m.runs <= 20 and 0 < m.min_ms <= m.p50_ms <= m.p95_ms  # type: ignore[operator]
    assert m.execution_provider == "CPUExecutionProvider"
    assert m.peak_rss_bytes and m.peak_rss_bytes > 10 << 20
    assert m.load_avg is not None and m.seconds is not None and m.seconds < 10
