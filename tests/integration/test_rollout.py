"""Rollouts through a real mosquitto: the server (in-process) and device stand-ins speaking the protocol.

These exercise the publisher, ingest, chunk server, rollout driver and outbox together; the
end-to-end tests in tests/e2e repeat the headline scenarios with real agent processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.app import FleetServer
from server.broker import MosquittoBroker
from server.builds import StaticBuilds
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.simulator.device import SIM_AGENT_VERSION
from tests.support.servers.fleet import Fleet, onnx_builds

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("builds"), "m", [1, 2, 3], ["rpi4", "jetson"])


@pytest.fixture
def fleet(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[Fleet]:
    with Fleet(tmp_path, fresh_broker, builds) as f:
        yield f


def test_canary_then_waves_over_two_profiles_streams_each_artifact_once(fleet: Fleet) -> None:
    devices = [fleet.device(f"w-{i}", profile="rpi4" if i % 2 else "jetson") for i in range(6)]
    fleet.wait_online(*devices)
    dep = fleet.service.deploy("m:1", target="group:g", canary_percent=10, wave_percent=50,
                               max_failures_percent=0, probation_s=0.2, actor="test")
    assert dep["waves"] == [1, 3, 2]
    assert set(dep["artifacts"]) == {"rpi4", "jetson"}
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",))
    assert all(d["state"] == "committed" for d in detail["devices"])
    assert all(d.active == ("m", 1) for d in devices)
    # waves were released in order: the canary committed before any wave-1 device was dispatched
    rows = {d["device_id"]: d for d in detail["devices"]}
    canary = [r for r in rows.values() if r["wave"] == 0]
    later = [r for r in rows.values() if r["wave"] > 0]
    assert len(canary) == 1
    assert all(r["dispatched_at"] >= canary[0]["finished_at"] for r in later)
    assert [e["kind"] for e in detail["events"]].count("deployment.wave") == 2
    # the shared stream carried each artifact about once; the devices took chunks from it
    stats = fleet.server.publish_stats
    counts = {p: fleet.server.artifacts.info(a).chunk_count for p, a in dep["artifacts"].items()}
    assert stats.chunks["broadcast"] <= 3 * sum(counts.values())  # canary + waves: a few rounds, never per device
    assert stats.chunks["unicast"] == 0
    assert all("art" in d.chunk_topics for d in devices)


def test_bad_version_halts_the_rollout_and_rolls_the_fleet_back(fleet: Fleet) -> None:
    good = [fleet.device(f"b-{i}", profile="rpi4" if i % 2 else "jetson", seed=("m", 1)) for i in range(3)]
    bad = [fleet.device(f"b-bad-{i}", profile="rpi4", seed=("m", 1), fail={2}) for i in range(2)]
    fleet.wait_online(*good, *bad)
    # canary: 1 device (online first, sorted: b-0); then waves of 2
    dep = fleet.service.deploy("m:2", target="group:g", canary_percent=20, wave_percent=50,
                               max_failures_percent=20, probation_s=0.2, actor="test")
    detail = fleet.wait_deployment(dep["deployment_id"], ("rolled_back",), timeout=45)
    assert "failed" in detail["reason"]
    failures = {f["device_id"]: f for f in detail["failures"]}
    assert set(failures) <= {"b-bad-0", "b-bad-1"} and failures
    assert all(f["code"] == "health.latency" and "latency" in f["reason"] for f in failures.values())
    # every device, including those that had committed v2, runs v1 again; nothing is stuck on v2
    for d in good + bad:
        d.wait_for(lambda s: s.active == ("m", 1))
    states = {r["device_id"]: r["state"] for r in detail["devices"]}
    assert states["b-0"] == "rolled_back"  # the canary committed v2, then was rolled back by command
    assert any(e["kind"] == "deployment.halted" for e in detail["events"])
    # the committed canary confirmed its rollback command
    results = [e for e in fleet.devices[0].events if e.kind == "command.result"]
    assert results and results[-1].data["ok"] is True
    # a device that was never released keeps running v1 and was skipped (none left pending)
    assert "pending" not in states.values()


def test_offline_device_converges_when_it_reconnects_and_late_joiners_are_included(fleet: Fleet) -> None:
    online = [fleet.device(f"o-{i}") for i in range(2)]
    offline = fleet.device("o-off", connect=False)
    fleet.wait_online(*online)
    dep = fleet.service.deploy("m:1", target="group:g", canary_percent=50, wave_percent=100,
                               max_failures_percent=0, probation_s=0.1, actor="test")
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",))
    rows = {d["device_id"]: d for d in detail["devices"]}
    assert rows["o-off"]["state"] == "dispatched" and not rows["o-off"]["online"]
    offline.connect()  # gets the retained desired state, downloads, commits
    offline.wait_for(lambda s: s.active == ("m", 1))
    fleet.wait_rows(dep["deployment_id"], lambda r: r["o-off"]["state"] == "committed")
    # a device added to the group after the rollout completed gets the same version
    late = fleet.device("o-late", groups=())
    fleet.service.group_add("g", ["o-late"])
    late.wait_for(lambda s: s.active == ("m", 1), timeout=30)
    detail = fleet.wait_rows(dep["deployment_id"], lambda r: r.get("o-late", {}).get("state") == "committed")
    assert any(e["kind"] == "deployment.joined" for e in detail["events"])


def test_operator_rollback_is_confirmed_per_device_and_pins_offline_ones(fleet: Fleet) -> None:
    devices = [fleet.device(f"r-{i}", seed=("m", 1)) for i in range(3)]
    fleet.wait_online(*devices)
    dep = fleet.service.deploy("m:2", target="group:g", canary_percent=34, wave_percent=100,
                               max_failures_percent=0, probation_s=0.1, actor="test")
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    devices[2].disconnect()
    fleet.wait_online(devices[2], online=False)  # the server knows it is offline before the rollback
    out = fleet.service.rollback(target="group:g", actor="alice")
    assert {d["device_id"]: d["to"] for d in out["devices"]} == {"r-0": 1, "r-1": 1, "r-2": 1}
    for d in devices[:2]:
        d.wait_for(lambda s: s.active == ("m", 1))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cmds = {c["device_id"]: c for c in fleet.service.command_batch(out["batch_id"])["commands"]}
        if all(cmds[d]["status"] == "ok" for d in ("r-0", "r-1")):
            break
        time.sleep(0.1)
    assert cmds["r-0"]["result"]["active"] == {"name": "m", "version": 1}
    assert cmds["r-2"]["status"] in ("sent", "pending")
    devices[2].connect()  # the queued command and the retained pin bring it back too
    devices[2].wait_for(lambda s: s.active == ("m", 1))
    # v2 is no longer what the group converges to: a late joiner is not given it
    assert not fleet.service.registry.get_deployment(dep["deployment_id"]).active


def test_server_restart_mid_rollout_resumes_from_the_registry(fleet: Fleet) -> None:
    devices = [fleet.device(f"s-{i}") for i in range(4)]
    fleet.wait_online(*devices)
    # a long device-side probation keeps the canary busy while the server goes away
    dep = fleet.service.deploy("m:1", target="group:g", canary_percent=25, wave_percent=100,
                               max_failures_percent=0, probation_s=2.0, actor="test")
    fleet.wait_rows(dep["deployment_id"], lambda r: any(x["state"] == "probation" for x in r.values()))
    fleet.server.stop()  # its lease is released; a crash (kill -9) is covered by the e2e tests
    deadline = time.monotonic() + 60  # the canary commits while no server is running: its events wait in the broker
    while not any(d.state.active_state == "committed" and d.active == ("m", 1) for d in devices):
        assert time.monotonic() < deadline, "the canary did not commit while the server was down"
        time.sleep(0.05)
    fleet.server = FleetServer(fleet.config, builds=fleet.builds).start()
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",), timeout=30)
    assert all(d["state"] == "committed" for d in detail["devices"])
    assert all(d.active == ("m", 1) for d in devices)


def test_bad_requests_get_clear_errors_and_change_nothing(fleet: Fleet) -> None:
    fleet.device("x-1", profile="rpi4")
    fleet.device("x-2", profile="coral", groups=("other",))
    svc = fleet.service
    with pytest.raises(NotFoundError, match="unknown model version m:9"):
        svc.deploy("m:9", target="group:g", actor="t")
    with pytest.raises(NotFoundError, match="unknown device 'nope'"):
        svc.deploy("m:1", target="device:nope", actor="t")
    with pytest.raises(NotFoundError, match="unknown group"):
        svc.deploy("m:1", target="group:missing", actor="t")
    with pytest.raises(InvalidRequestError, match=r"no variant of m:1 is built for profile.*coral"):
        svc.deploy("m:1", target="group:other", actor="t")
    with pytest.raises(InvalidRequestError, match="MODEL:VERSION"):
        svc.deploy("m", target="all", actor="t")
    with pytest.raises(InvalidRequestError, match="wave must be within"):
        svc.deploy("m:1", target="group:g", wave_percent=0, actor="t")
    assert svc.list_deployments() == []
    first = svc.deploy("m:1", target="group:g", probation_s=30, actor="t")
    with pytest.raises(ConflictError, match=first["deployment_id"]):
        svc.deploy("m:2", target="device:x-1", actor="t")
    assert len(svc.list_deployments()) == 1
    fleet.service.halt(first["deployment_id"], rollback=False, actor="t")
    assert svc.deploy("m:2", target="device:x-1", actor="t")["status"] == "running"


def test_malformed_device_messages_are_rejected_recorded_and_harmless(fleet: Fleet) -> None:
    from tests.support.mqtt import MqttTestClient

    d = fleet.device("m-1")
    fleet.wait_online(d)
    c = MqttTestClient(fleet.broker.host, fleet.broker.port)
    try:
        base = "edgefleet/v1/dev"
        c.publish(f"{base}/m-1/up/event", b"{not json")
        c.publish(f"{base}/m-1/up/event", b'{"schema": "9.0", "type": "event"}')
        c.publish(f"{base}/m-1/up/telemetry", b'{"schema": "1.0", "type": "telemetry", "device_id": "m-1"}')
        c.publish(f"{base}/m-1/up/state", b'{"schema":"1.0","type":"state","device_id":"other","online":true,'
                                          b'"session":1,"ts":1}')
        c.publish(f"{base}/ghost/up/event", b'{"schema":"1.0","type":"event","device_id":"ghost","ts":1,'
                                            b'"event_id":"e","kind":"x","severity":"info","message":""}')
        c.publish(f"{base}/m-1/up/event", b"x" * 40_000)
        c.publish(f"{base}/m-1/up/chunkreq", b'{"schema":"1.0","type":"chunk_request","device_id":"m-1",'
                                             b'"artifact_id":"' + b"0" * 32 + b'","ranges":[[5,1]],"ts":1,'
                                             b'"reason":"initial"}')
    finally:
        c.close()
    expected = {"malformed", "unsupported_version", "device_mismatch", "unknown_device", "message_too_large"}
    deadline = time.monotonic() + 60
    codes: set[str] = set()
    while time.monotonic() < deadline and not expected <= codes:
        codes = {e["code"] for e in fleet.service.events(kind="ingest.rejected")["events"]}
        time.sleep(0.1)
    assert expected <= codes
    text = fleet.server.render_metrics()
    assert 'edgefleet_ingest_rejected_total{code="malformed"}' in text
    # the server still works for the well-behaved device
    dep = fleet.service.deploy("m:1", target="device:m-1", probation_s=0.1, actor="t")
    fleet.wait_deployment(dep["deployment_id"], ("completed",))


def test_desired_states_are_re_signed_before_expiry(fleet: Fleet) -> None:
    d = fleet.device("e-1")
    fleet.wait_online(d)
    dep = fleet.service.deploy("m:1", target="device:e-1", probation_s=0.1, actor="t")
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    before = fleet.service.registry.get_desired("e-1")
    assert before is not None
    seq_before = d.state.last_seq
    n = fleet.server.outbox.resign_expiring(time.time() + 30 * 86400)  # as if it expired within the margin
    assert n == 1
    fleet.server.kick()
    d.wait_for(lambda s: s.state.last_seq > seq_before)
    after = fleet.service.registry.get_desired("e-1")
    assert after is not None and after.seq > before.seq and after.expires_at >= before.expires_at
    assert d.active == ("m", 1)  # same content: no re-download, nothing changed on the device
    assert not [e for e in d.events if e.kind == "desired.rejected"]


def test_stale_desired_state_is_flagged_in_status(fleet: Fleet) -> None:
    d = fleet.device("st-1")
    d.state.desired_expires_at = time.time() - 60  # the device says its desired state expired
    d.disconnect()
    d.connect()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = next(r for r in fleet.service.list_devices() if r["device_id"] == "st-1")
        if row["stale"]:
            break
        time.sleep(0.1)
    assert row["stale"]


def _enroll(fleet: Fleet, d: Any) -> list[dict[str, object]]:
    """Send the device's enrollment request; the pending enrollments once the server has it (60 s at most)."""
    d.enroll()
    deadline = time.monotonic() + 60
    pending: list[dict[str, object]] = []
    while time.monotonic() < deadline and not pending:
        pending = fleet.service.pending_enrollments()
        time.sleep(0.1)
    return pending


def test_enrollment_request_is_approved_by_fingerprint(fleet: Fleet) -> None:
    d = fleet.device("en-1", register=False, connect=True, groups=())
    pending = _enroll(fleet, d)
    assert pending and pending[0]["device_id"] == "en-1"
    with pytest.raises(InvalidRequestError, match="fingerprint mismatch"):
        fleet.service.approve_device("en-1", fingerprint_check="00" * 8)
    out = fleet.service.approve_device("en-1", fingerprint_check=str(pending[0]["fingerprint"]), groups=["g"])
    assert out["device"]["status"] == "active" and out["device"]["public_key"] == d.public_key_b64
    d.disconnect()
    d.connect()  # its messages are accepted now that it is registered
    dep = fleet.service.deploy("m:1", target="device:en-1", probation_s=0.1, actor="t")
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    fleet.service.revoke_device("en-1")
    with pytest.raises(ConflictError, match="revoked"):
        fleet.service.deploy("m:2", target="device:en-1", actor="t")


def test_device_approved_while_connected_is_online_without_reconnecting(fleet: Fleet) -> None:
    d = fleet.device("en-live", register=False, connect=True, groups=(), seed=("m", 1))  # birth report, then enroll
    pending = _enroll(fleet, d)
    assert pending and pending[0]["device_id"] == "en-live"
    out = fleet.service.approve_device("en-live", fingerprint_check=str(pending[0]["fingerprint"]), groups=["g"])
    dev = out["device"]
    assert dev["online"] and dev["last_seen"] is not None, dev  # its retained birth report, not a reconnect
    assert (dev["active_model"], dev["active_version"], dev["agent_version"]) == ("m", 1, SIM_AGENT_VERSION)
    row = next(r for r in fleet.service.list_devices() if r["device_id"] == "en-live")  # what `status` shows
    assert row["online"] and row["session"] == d.state.session
    assert "device.online" in [e["kind"] for e in fleet.service.events(device_id="en-live")["events"]]
    dep = fleet.service.deploy("m:2", target="device:en-live", probation_s=0.1, actor="t")
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    assert d.active == ("m", 2)
    d.disconnect()  # the Last Will of the adopted session still takes it offline
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fleet.server.registry.get_device("en-live").online:
        time.sleep(0.1)
    assert not fleet.server.registry.get_device("en-live").online
