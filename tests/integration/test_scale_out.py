"""Nothing assumes one server process: two servers share a registry and a broker, and a transfer
interrupted by a connection drop resumes with only the missing chunks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import FleetServer
from server.broker import MosquittoBroker
from server.builds import StaticBuilds
from tests.support.servers.fleet import Fleet, onnx_builds
from tests.support.waiting import wait_progress

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("builds"), "m", [1, 2, 3], ["rpi4"], chunk_size=4096, hidden=2048)


def _second_server(fleet: Fleet, name: str) -> FleetServer:
    cfg = fleet.config
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, instance_id=name),
        broker=dataclasses.replace(cfg.broker, client_id=f"srv-{name}"),
    )
    return FleetServer(cfg, builds=fleet.builds).start()


def _crash(server: FleetServer) -> None:
    """Stop a server without any goodbye: its leases stay until they expire."""
    server._stop.set()
    server._wake.set()
    if server._loop_thread is not None:
        server._loop_thread.join(10)
    server.http.stop()
    server.chunks.stop()
    if server.takeover is not None:
        server.takeover._stopped.set()  # its session lease is no longer renewed (not released)
    server.link.stop()
    server.ingest.stop()


@pytest.fixture
def fleet(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[Fleet]:
    with Fleet(tmp_path, fresh_broker, builds, {"broker": {"shared_subscriptions": True}}) as f:
        yield f


def test_two_servers_split_the_work_and_one_takes_over_when_the_other_dies(fleet: Fleet) -> None:
    other = _second_server(fleet, "b")
    try:
        devices = [fleet.device(f"so-{i}", seed=("m", 1)) for i in range(4)]
        fleet.wait_online(*devices)
        dep = fleet.service.deploy("m:2", target="group:g", canary_percent=25, wave_percent=100,
                                   max_failures_percent=0, probation_s=0.1, actor="t")
        detail = fleet.wait_deployment(dep["deployment_id"], ("completed",), timeout=40)
        assert all(d["state"] == "committed" for d in detail["devices"])
        assert all(d.active == ("m", 2) for d in devices)
        # device traffic was split by the shared subscription: both servers ingested some of it
        a_events = fleet.server.ingest.stats.received["event"]
        b_events = other.ingest.stats.received["event"]
        assert a_events > 0 and b_events > 0, (a_events, b_events)
        # each event recorded once, whichever server got it. The rollout completes on the devices' state reports;
        # a committed event ingested by the other server may still be in its batch then, so wait for it to land
        committed: list[dict[str, object]] = []

        def recorded() -> bool:
            committed[:] = fleet.service.events(kind="lifecycle.committed", limit=100)["events"]
            return len(committed) >= 4

        wait_progress(recorded, what="4 committed events recorded", progress=lambda: len(committed),
                      describe=lambda: repr(committed), stall_s=60.0)
        assert sorted(str(e["device_id"]) for e in committed) == [f"so-{i}" for i in range(4)], committed

        # the next rollout's driver dies with its lease held; the other server resumes it
        dep3 = fleet.service.deploy("m:3", target="group:g", canary_percent=25, wave_percent=100,
                                    max_failures_percent=0, probation_s=1.5, actor="t")
        owner = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and owner is None:
            owner = fleet.service.registry.get_deployment(dep3["deployment_id"]).lease_owner
            time.sleep(0.05)
        assert owner is not None
        dying = fleet.server if owner == fleet.server.owner else other
        survivor = other if dying is fleet.server else fleet.server
        _crash(dying)
        # the survivor takes the lease once it expires, then completes the rollout: wait while the rollout moves
        detail3: dict[str, object] = {}

        def completed() -> bool:
            detail3.update(survivor.service.deployment_detail(dep3["deployment_id"]))
            return detail3["status"] == "completed"

        wait_progress(completed, what="the survivor completing the rollout", stall_s=60.0,
                      progress=lambda: (detail3.get("status"), repr(detail3.get("devices"))),
                      describe=lambda: repr(detail3))
        assert survivor.registry.get_deployment(dep3["deployment_id"]).lease_owner == survivor.owner
        assert all(d.active == ("m", 3) for d in devices)
        if dying is fleet.server:
            fleet.server = survivor  # so the fixture stops the live one
            other = None  # type: ignore[assignment]
    finally:
        if other is not None:
            other.stop()


def test_interrupted_transfer_resumes_with_only_the_missing_chunks(fleet: Fleet) -> None:
    d = fleet.device("rs-1")
    fleet.wait_online(d)
    dep = fleet.service.deploy("m:1", target="device:rs-1", probation_s=0.1, actor="t")
    artifact = dep["artifacts"]["rpi4"]
    count = fleet.server.artifacts.info(artifact).chunk_count
    assert count > 40
    d.ignore_chunks_after = count // 3  # the link dies a third of the way in, however fast the transfer runs
    d.wait_for(lambda s: s.received_chunks >= count // 3, timeout=20)
    d.disconnect()  # power cut mid-download (the broker sends its Will)
    got_before = d.received_chunks
    fleet.wait_online(d, online=False)  # the server saw the Will
    d.ignore_chunks_after = None
    d.connect()  # asks for what it lacks ("resume")
    d.wait_for(lambda s: s.active == ("m", 1), timeout=30)
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    assert got_before < count
    assert d.received_chunks < got_before + count  # it did not start over


@pytest.fixture
def short_leases(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[Fleet]:
    with Fleet(tmp_path, fresh_broker, builds,
               {"broker": {"shared_subscriptions": True}, "rollout": {"lease_ttl_s": 2.0}}) as f:
        yield f


def test_a_server_killed_and_not_restarted_loses_no_device_event(short_leases: Fleet) -> None:
    """mosquitto keeps routing a dead member's share of a shared subscription into its persistent session; the
    survivor takes that session over (server/takeover.py) and records every event the dead one was owed."""
    fleet = short_leases
    other = _second_server(fleet, "b")
    devices = [fleet.device(f"nr-{i}", seed=("m", 1)) for i in range(6)]
    fleet.wait_online(*devices)
    _crash(other)  # no restart: its session (and its turn of the shared subscriptions) stays in the broker
    dep = fleet.service.deploy("m:2", target="group:g", canary_percent=0, wave_percent=100,
                               max_failures_percent=0, probation_s=0.1, actor="t")
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",), timeout=40)
    assert all(d["state"] == "committed" for d in detail["devices"])
    committed: set[str] = set()
    deadline = time.monotonic() + 30  # the lease (2 s) expires, the survivor resumes the dead session
    while time.monotonic() < deadline and len(committed) < len(devices):
        committed = {e["device_id"] for e in fleet.service.events(
            kind="lifecycle.committed", deployment_id=dep["deployment_id"], limit=100)["events"]}
        time.sleep(0.1)
    assert committed == {d.device_id for d in devices}
    assert "srv-b" in fleet.server.takeover.held  # type: ignore[union-attr]
    # the dead server's share went on arriving through the taken-over session, not only what was queued
    assert fleet.server.ingest.stats.received["event"] > 0
