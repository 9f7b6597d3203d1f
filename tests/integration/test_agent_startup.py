"""Starting a real agent process: where its local API listens, and what a test sees when it cannot start.

Issue 11: under load one agent of the e2e fleet never came online. A port picked by the test and
handed to the agent could be taken by another process before the agent bound it, and the agent
exited; the fixture waited out its budget and said only "not online". Now the agent binds
``port = 0`` and says in ``status.json`` which port it got, and a wait on an agent that has
exited fails at once with its log.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.support.devices.agent_process import ROOT
from tests.support.devices.fixtures import AgentFactory, agent_factory, fleet, models, serving_v1
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer
from tests.support.waiting import WaitError

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def test_port_zero_is_the_bound_port_in_status_json_and_agent_status(
    agent_factory: AgentFactory, fleet: FleetServer, models: AgentModels
) -> None:
    agent = serving_v1(agent_factory, fleet, models, prefix="port0")
    agent.wait_http_ready()
    port = agent.http_port
    assert port > 0
    status = json.loads((agent.store_dir / "status.json").read_text())
    assert agent.proc is not None and status["pid"] == agent.proc.pid
    assert status["http"] == f"http://127.0.0.1:{port}"
    # `edgefleet-agent status` asks the running agent at the port it bound, not the configured 0
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(agent.config_path), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    local_api = json.loads(out.stdout)["local_api"]
    assert local_api["url"] == f"http://127.0.0.1:{port}"
    assert local_api["ready"] is True


def test_an_agent_that_cannot_start_fails_the_wait_at_once_with_its_log(agent_factory: AgentFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # what another process did with a port handed to the agent (issue 11)
        port = taken.getsockname()[1]
        agent = agent_factory(prefix="taken", settings={"http": {"port": port}})
        with pytest.raises(WaitError) as caught:
            agent.wait_http_ready(timeout=600)  # a stall budget it must not need: the exit ends the wait
    message = str(caught.value)
    assert "the agent exited" in message, message
    assert "cannot serve HTTP" in message, message  # its own log, in the failure
    assert f"agent {agent.device_id}: exited with" in message, message


def test_describe_says_what_a_running_agent_logged(agent_factory: AgentFactory) -> None:
    agent = agent_factory(prefix="desc")
    assert agent.http("/v2/health/live")[0] == 200  # waits for status.json to name the port, then asks
    text = agent.describe()
    assert f"agent {agent.device_id}: running as pid" in text
    assert "serving the Open Inference Protocol" in text
