"""The real server offers deltas: two real agents keep digits:1; the rollout of digits:2 builds one delta artifact
(shared by both), signs it into each deploy, the agents fetch and apply it, and the deployment's transfer summary
and /metrics show the bytes saved."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from server.broker import MosquittoBroker
from server.metrics import render_metrics
from tests.support.delta import fine_tuned
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import assert_serves, models
from tests.support.models.agent import AgentModels
from tests.support.servers.faulty import RealServer
from tests.support.servers.stub import unique_device_id

__all__ = ["models"]

pytestmark = pytest.mark.broker


def _completed(server: RealServer, deployment_id: str, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    detail: dict[str, Any] = {}
    while time.monotonic() < deadline:  # polls observable registry state
        detail = server.service.deployment_detail(deployment_id)
        if detail["status"] in ("completed", "halted", "rolled_back"):
            return detail
        time.sleep(0.2)
    raise TimeoutError(f"deployment {detail.get('status')}: {detail.get('devices')}")


def test_rollout_sends_one_shared_delta_to_devices_keeping_the_base(
    tmp_path: Path, broker: MosquittoBroker, models: AgentModels
) -> None:
    v2 = tmp_path / "v2.onnx"
    v2.write_bytes(fine_tuned(models.good))
    builds = [{"model": "digits", "version": v, "profile": RealServer.PROFILE, "path": str(p),
               "input": models.input_name, "probation_s": 0.5, "chunk_size": 2048}
              for v, p in ((1, models.good), (2, v2))]  # fmt: skip
    server = RealServer(tmp_path, broker.host, broker.port, builds)
    agents = [AgentProcess(tmp_path, unique_device_id("srvdelta"), broker_host=broker.host, broker_port=broker.port,
                           server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
              for _ in range(2)]  # fmt: skip
    try:
        server.process.start()
        for a in agents:
            a.start()
        first = server.service.deploy("digits:1", target="group:g", canary_percent=0, wave_percent=100,
                                      max_failures_percent=0, probation_s=0.5, actor="test")  # fmt: skip
        assert _completed(server, first["deployment_id"])["status"] == "completed"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(  # the server learns what each device keeps
            1 in d["kept"] for d in server.service.list_devices() if d["device_id"] in {a.device_id for a in agents}
        ):
            time.sleep(0.2)
        dep = server.service.deploy("digits:2", target="group:g", canary_percent=0, wave_percent=100,
                                    max_failures_percent=0, probation_s=0.5, actor="test")  # fmt: skip
        detail = _completed(server, dep["deployment_id"])
        assert detail["status"] == "completed", detail["devices"]
        t = detail["transfer"]
        assert t["devices_delta"] == 2 and t["devices_fallback"] == 0, (t, detail["events"])
        assert t["bytes_sent"] < 0.6 * t["bytes_full"], t
        deltas = (
            server.registry.db.connection()
            .execute("SELECT COUNT(*) FROM artifacts WHERE variant = 'delta'")
            .fetchone()[0]
        )
        assert deltas == 1, "devices on the same base share one delta artifact"
        text = render_metrics(server.registry)
        assert 'edgefleet_delta_updates{outcome="applied"} 2' in text, text
        for a in agents:
            assert_serves(a, models, wait_ready=True)
    finally:
        for a in agents:
            a.kill()
        server.process.kill()
