"""pytest fixtures for agent tests against the session broker: a test server, real models, agent processes.

tests/conftest.py registers this module as a pytest plugin, so every test module can ask for its
fixtures by name; the helpers (``deploy_and_commit``, ``assert_serves``...) are imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol.messages import DesiredState, HealthSpec
from server.broker import MosquittoBroker
from tests.support.devices.agent_process import AgentProcess
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> AgentModels:
    return agent_models.build(tmp_path_factory.mktemp("agent-models"))


@pytest.fixture
def fleet(broker: MosquittoBroker) -> Iterator[FleetServer]:
    server = FleetServer(broker.host, broker.port)
    yield server
    server.close()


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agent_factory(tmp_path: Path, broker: MosquittoBroker, fleet: FleetServer) -> Iterator[AgentFactory]:
    """``agent_factory(settings=..., prefix=...)`` -> a started agent; all are killed at teardown."""
    made: list[AgentProcess] = []

    def make(*, settings: dict[str, Any] | None = None, prefix: str = "dev", start: bool = True) -> AgentProcess:
        agent = AgentProcess.on(broker, fleet, tmp_path, prefix, settings)
        made.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in made:
        agent.kill()


@pytest.fixture
def agent_v1(fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory) -> AgentProcess:
    """A started agent serving the good digits model as v1, committed (where most agent tests begin)."""
    return serving_v1(agent_factory, fleet, models)


@pytest.fixture
def agent_v2(fleet: FleetServer, models: AgentModels, agent_v1: AgentProcess) -> AgentProcess:
    """The ``agent_v1`` agent after a second deploy: v2 (``good_v2``) committed and serving, v1 kept."""
    deploy_and_commit(fleet, agent_v1, models, 2, "good_v2")
    return agent_v1


def serving_v1(agent_factory: AgentFactory, fleet: FleetServer, models: AgentModels, **kw: Any) -> AgentProcess:
    """``agent_factory(**kw)`` (a started agent) once it serves the good digits model as v1, committed."""
    agent = agent_factory(**kw)
    deploy_and_commit(fleet, agent, models, 1)
    return agent


def deploy_digits(
    fleet: FleetServer,
    agent: AgentProcess,
    models: AgentModels,
    version: int,
    which: str = "good",
    *,
    health: HealthSpec | None = None,
    **options: Any,
) -> DesiredState:
    """Send the digits model ``which`` (an ``AgentModels`` field) to ``agent`` as ``version`` (ONNX; ``health``
    by default ``models.health()``; ``options`` as ``FleetServer.deploy`` takes them); no wait."""
    return fleet.deploy(agent.device_id, models.bytes_of(which), agent_models.ref(version), runtime=agent_models.ONNX,
                        health=health or models.health(), **options)


def deploy_and_commit(
    fleet: FleetServer,
    agent: AgentProcess,
    models: AgentModels,
    version: int,
    which: str = "good",
    *,
    timeout: float = 60.0,
    chunk_size: int = 16 * 1024,
    **health: Any,
) -> None:
    """Deploy ``which`` as ``version`` and wait until it is committed and serving."""
    mark = fleet.event_count(agent.device_id)
    deploy_digits(fleet, agent, models, version, which, health=models.health(**health), chunk_size=chunk_size)
    event = fleet.wait_event(
        agent.device_id,
        lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
        after=mark,
        timeout=timeout,
    )
    assert event.kind == "lifecycle.committed", (
        f"{event.kind}: {event.message} {event.data}\n{agent.log_text()[-4000:]}"
    )
    assert event.model == agent_models.ref(version)
    fleet.wait_state(
        agent.device_id,
        lambda s: s.lifecycle == "idle" and s.active is not None and s.active.version == version,
        timeout=timeout,
    )


def assert_serves(
    agent: AgentProcess, models: AgentModels, *, samples: int = 16, wait_ready: bool = False
) -> np.ndarray:
    """The local HTTP API answers with finite logits that classify real digits correctly (``wait_ready``: once it
    answers ready, for an agent just started or restarted)."""
    if wait_ready:
        agent.wait_http_ready()
    x = models.samples[:samples]
    status, body = agent.infer(agent_models.NAME, models.input_name, x)
    assert status == 200, body
    (output,) = [o for o in body["outputs"] if o["name"] == "logits"]
    logits = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    assert np.isfinite(logits).all()
    accuracy = float((logits.argmax(1) == models.labels[:samples]).mean())
    assert accuracy >= 0.9, f"served model classifies only {accuracy:.0%} of real digits"
    return logits
