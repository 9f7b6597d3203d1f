"""``lifecycle.latency_scale``: a board known to be slower than its profile (an emulated one) scales the
server's latency budgets instead of the server weakening them for everyone."""

from __future__ import annotations

import pytest

from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, fleet, models
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def _deploy_slow(fleet: FleetServer, agent_models_: AgentModels, device_id: str) -> str:
    mark = fleet.event_count(device_id)
    fleet.deploy(
        device_id,
        agent_models_.bytes_of("slow"),  # +150 ms per request
        agent_models.ref(2),
        runtime=agent_models.ONNX,
        health=agent_models_.health(latency_budget_ms=50.0),
    )
    event = fleet.wait_event(
        device_id,
        lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
        after=mark,
        timeout=60,
    )
    return event.kind


def test_the_same_budget_rolls_back_at_scale_1_and_passes_at_scale_100(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    strict = agent_factory()
    deploy_and_commit(fleet, strict, models, 1)
    assert _deploy_slow(fleet, models, strict.device_id) == "lifecycle.rolled_back"

    scaled = agent_factory(settings={"lifecycle": {"latency_scale": 100.0}})
    deploy_and_commit(fleet, scaled, models, 1)
    assert _deploy_slow(fleet, models, scaled.device_id) == "lifecycle.committed", scaled.log_text()[-3000:]
