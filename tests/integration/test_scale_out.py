"""Nothing assumes one server process: two servers share a registry and a broker, and a transfer
interrupted by a connection drop resumes with only the missing chunks."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol.envelope import raw_public
from server.app import FleetServer
from server.broker import SERVER_USER, MosquittoBroker, current_user
from server.builds import StaticBuilds
from server.cli import main as edgefleet
from server.config import ServerConfig, config_from_mapping, load_config
from server.errors import ConfigError
from server.keys import load_signing_key
from tests.support.abuse import local_service, start_mosquitto
from tests.support.device import DeviceUnderTest
from tests.support.servers.fleet import Fleet, onnx_builds
from tests.support.servers.settings import server_settings
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


def _rollout_loses_no_event(survivor: FleetServer, dead: str, devices: list[DeviceUnderTest]) -> None:
    """Roll m:2 out to ``devices`` while the server whose session is ``dead`` lies dead: every device's commit
    event reaches the registry, through the dead session the survivor took over."""
    dep = survivor.service.deploy("m:2", target="group:g", canary_percent=0, wave_percent=100,
                                  max_failures_percent=0, probation_s=0.1, actor="t")
    detail: dict[str, object] = {}

    def completed() -> bool:
        detail.update(survivor.service.deployment_detail(dep["deployment_id"]))
        return detail["status"] == "completed"

    wait_progress(completed, what="the rollout completing", stall_s=60.0, describe=lambda: repr(detail),
                  progress=lambda: (detail.get("status"), repr(detail.get("devices"))))
    assert all(d["state"] == "committed" for d in detail["devices"])  # type: ignore[attr-defined]
    committed: set[str] = set()
    deadline = time.monotonic() + 30  # the lease (2 s) expires, the survivor resumes the dead session
    while time.monotonic() < deadline and len(committed) < len(devices):
        committed = {e["device_id"] for e in survivor.service.events(
            kind="lifecycle.committed", deployment_id=dep["deployment_id"], limit=100)["events"]}
        time.sleep(0.1)
    assert committed == {d.device_id for d in devices}
    assert dead in survivor.takeover.held  # type: ignore[union-attr]
    # the dead server's share went on arriving through the taken-over session, not only what was queued
    assert survivor.ingest.stats.received["event"] > 0


def test_a_server_killed_and_not_restarted_loses_no_device_event(short_leases: Fleet) -> None:
    """mosquitto keeps routing a dead member's share of a shared subscription into its persistent session; the
    survivor takes that session over (server/takeover.py) and records every event the dead one was owed."""
    fleet = short_leases
    other = _second_server(fleet, "b")
    devices = [fleet.device(f"nr-{i}", seed=("m", 1)) for i in range(6)]
    fleet.wait_online(*devices)
    _crash(other)  # no restart: its session (and its turn of the shared subscriptions) stays in the broker
    _rollout_loses_no_event(fleet.server, "srv-b", devices)


def test_on_the_generated_secured_broker_a_survivor_takes_over_as_the_dead_servers_login(
    tmp_path: Path, builds: StaticBuilds
) -> None:
    """The broker `edgefleet broker config --server-logins 2` writes (TLS, passwords, ACL, client id bound to the
    login) and the [broker] section it writes: the survivor takes over the dead server's session with that
    server's login ([broker] peer_logins), and no device event is lost."""
    home, out = tmp_path / "home", tmp_path / "broker"
    service = local_service(home)
    keys = {f"sec-{i}": X25519PrivateKey.generate() for i in range(6)}
    passwords = {dev: service.register_device(
        dev, profile="rpi4", public_key=base64.b64encode(raw_public(key.public_key())).decode(), groups=["g"],
    )["broker_password"] for dev, key in keys.items()}

    def configure(port: int) -> Path:
        assert edgefleet(["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                          "--port", str(port), "--run-as", current_user(), "--server-logins", "2"]) == 0
        return out / "mosquitto.conf"

    proc, port = start_mosquitto(configure, tmp_path / "mosquitto.log")
    servers: list[FleetServer] = []
    devices: list[DeviceUnderTest] = []
    try:
        generated = load_config(home).broker  # the [broker] section broker config wrote (for the first server)

        def config(login: str, instance: str) -> ServerConfig:
            cfg = config_from_mapping(home, server_settings(generated.url, "", device_timeout_s=30.0,
                                                            overrides={"server": {"instance_id": instance}}))
            password_file = "keys/broker-server.password" if login == SERVER_USER else f"keys/broker-{login}.password"
            broker = dataclasses.replace(generated, username=login, password_file=password_file)
            return dataclasses.replace(cfg, broker=broker).validate()

        # a server without a peer's password refuses to start, naming the file (not when that peer dies)
        lacking = config(SERVER_USER, "x")
        lacking = dataclasses.replace(lacking, broker=dataclasses.replace(
            lacking.broker, peer_logins=(*lacking.broker.peer_logins, f"{SERVER_USER}-3")))
        with pytest.raises(ConfigError, match=rf"keys/broker-{SERVER_USER}-3\.password"):
            FleetServer(lacking, builds=builds)
        a = FleetServer(config(SERVER_USER, "a"), builds=builds).start()
        servers.append(a)
        b = FleetServer(config(f"{SERVER_USER}-2", "b"), builds=builds).start()
        servers.append(b)
        assert a.config.broker.peer_logins == (SERVER_USER, f"{SERVER_USER}-2")
        ca = str(out / "tls" / "ca.crt")
        trust = load_signing_key(a.config.paths).public_key()
        for dev, key in keys.items():
            d = DeviceUnderTest(dev, host="127.0.0.1", port=port, server_public_key=trust, key=key, username=dev,
                                password=passwords[dev], ca_cert=ca)
            d.seed("m", 1)
            devices.append(d.connect())

        seen: list[str] = []

        def online() -> bool:
            seen[:] = [d.device_id for d in a.registry.list_devices() if d.online]
            return len(seen) == len(devices)

        wait_progress(online, what="devices online", progress=lambda: len(seen), describe=lambda: repr(seen),
                      stall_s=60.0)
        _crash(b)  # no restart; the broker binds client id to login: only b's login resumes b's session
        servers.remove(b)
        _rollout_loses_no_event(a, f"{SERVER_USER}-2", devices)
        assert all(link.connected.is_set() for link in a.takeover.held[f"{SERVER_USER}-2"])  # type: ignore[union-attr]
    finally:
        for d in devices:
            d.close()
        for s in servers:
            s.stop()
        proc.terminate()
        proc.wait(timeout=10)
        service.registry.db.close()
