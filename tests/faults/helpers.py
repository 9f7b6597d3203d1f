"""Checks shared by the fault scenarios: the device still serves its committed model and lost nothing."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

from tests.support.devices.agent_process import ROOT, AgentProcess
from tests.support.devices.fixtures import assert_serves
from tests.support.faults import FaultLedger, kept_versions, read_journal
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.fleet import Fleet
from tests.support.servers.stub import FleetServer


def intact(
    fleet: FleetServer,
    agent: AgentProcess,
    models: AgentModels,
    version: int,
    *,
    kept: set[int] | None = None,
    timeout: float = 30.0,
    ledger: FaultLedger | None = None,
) -> None:
    """Assert the device serves committed ``version`` (state, journal, real inference) and kept every version.

    With a ledger, records one trial: passed, or failed with the device counted as unserving or a record lost.
    """
    try:
        _serving(fleet, agent, models, version, timeout)
    except (AssertionError, TimeoutError, RuntimeError):
        if ledger is not None:
            ledger.trial(False, unserving=1)
        raise
    on_disk = kept_versions(agent.store_dir)
    missing = (kept or {version}) - on_disk
    if missing and ledger is not None:
        ledger.trial(False, lost=len(missing))
    assert not missing, f"committed versions lost from the store: {sorted(missing)} (on disk: {sorted(on_disk)})"
    if ledger is not None:
        ledger.trial()


def _serving(fleet: FleetServer, agent: AgentProcess, models: AgentModels, version: int, timeout: float) -> None:
    assert agent.running, f"agent exited:\n{agent.log_text()[-3000:]}"
    state = fleet.wait_state(
        agent.device_id,
        lambda s: s.online and s.lifecycle == "idle" and s.active is not None and s.active.version == version,
        timeout=timeout,
    )
    assert state.active is not None and state.active.state == "committed"
    journal = read_journal(agent.store_dir)
    assert journal is not None and journal.committed == agent_models.ref(version)
    assert_serves(agent, models, wait_ready=True)


def register_on(server: Fleet, fleet: FleetServer, agent: AgentProcess, profile: str, **options: Any) -> None:
    """Register ``agent``'s device with the real ``server``, with the public key it enrolled at the test server."""
    public = fleet.log(agent.device_id).public_key
    assert public is not None
    server.service.register_device(agent.device_id, profile=profile,
                                   public_key=base64.b64encode(public.public_bytes_raw()).decode(), **options)


def agent_status(agent: AgentProcess) -> dict[str, Any]:
    """``edgefleet-agent status --json`` against the agent's config (a separate process, as an operator runs it)."""
    done = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--config", str(agent.config_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def edit_payload(blob: bytes, edit: Any) -> bytes:
    """Change the signed payload of a DSSE envelope, keeping the original signature (so it must fail)."""
    env = json.loads(blob)
    payload = json.loads(base64.b64decode(env["payload"]))
    edit(payload)
    env["payload"] = base64.b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).decode()
    return json.dumps(env).encode()


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)
