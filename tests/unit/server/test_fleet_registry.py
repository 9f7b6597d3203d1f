"""The fleet registry on both backends (a real SQLite file, a real PostgreSQL database): counters, leases,
conflicts, ingest rules."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.messages import ActiveModel, Event, StateReport, Telemetry
from server.errors import ConflictError, NotFoundError
from server.registry.db import open_database
from server.registry.fleet import (
    DEP_RUNNING,
    ArtifactRecord,
    DeploymentBuild,
    FleetRegistry,
    IngestBatch,
    NewDeployment,
)

KEY = "A" * 43 + "="


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def registry(registry_url: str) -> Iterator[FleetRegistry]:
    r = FleetRegistry(open_database(registry_url, Path("unused")))
    r.migrate()
    yield r
    r.db.close()


def other_process(registry_url: str) -> FleetRegistry:
    """A second registry object on the same database: what another server process sees."""
    return FleetRegistry(open_database(registry_url, Path("unused")))


def test_migrations_apply_once(registry: FleetRegistry) -> None:
    assert registry.migrate() == []


def test_device_registration_and_duplicates(registry: FleetRegistry) -> None:
    dev = registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None, groups=["g1", "g2"])
    assert dev.status == "active" and dev.groups == ("g1", "g2")
    with pytest.raises(ConflictError, match="already registered"):
        registry.add_device("d1", profile="rpi4", public_key=None, broker_hash=None)
    assert registry.add_device("d2", profile="rpi4", public_key=None, broker_hash=None).status == "awaiting_key"
    with pytest.raises(NotFoundError, match="unknown device"):
        registry.get_device("nope")


def test_seq_counter_is_shared_and_unique_across_processes(registry_url: str, registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    seen: list[int] = []
    lock = threading.Lock()

    def allocate() -> None:
        r = other_process(registry_url)
        for _ in range(25):
            with r.tx() as tx:
                s = r.next_seq(tx, "d1")
            with lock:
                seen.append(s)
        r.db.close()

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 101))


def test_seq_never_goes_below_what_the_device_reported(registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    report = StateReport(device_id="d1", online=True, session=1, ts=1.0, last_seq=41)
    registry.write_ingest(IngestBatch(states=[report]), bucket_s=60)
    with registry.tx() as tx:
        assert registry.next_seq(tx, "d1") == 42


def test_leases_exclude_other_owners_until_expiry(registry_url: str, registry: FleetRegistry) -> None:
    other = other_process(registry_url)
    assert registry.acquire_lease("outbox", "a", 10, now=100.0)
    assert not other.acquire_lease("outbox", "b", 10, now=105.0)
    assert registry.acquire_lease("outbox", "a", 10, now=105.0)  # renewal
    assert other.acquire_lease("outbox", "b", 10, now=116.0)  # a's lease ran out
    assert registry.lease_holder("outbox", now=117.0) == "b"
    other.release_lease("outbox", "b")
    assert registry.lease_holder("outbox", now=118.0) is None


def _deployment(dep_id: str, devices: list[str]) -> NewDeployment:
    return NewDeployment(
        deployment_id=dep_id, model="m", version=2, target="group:g", canary_percent=10, wave_percent=50,
        max_failures_percent=10, probation_s=None, created_by="t",
        builds=[DeploymentBuild(dep_id, "rpi4", "a" * 32, "fp32", {}, {})],
        devices=[(d, "rpi4", 0, 1) for d in devices], wave_count=1,
    )


def _artifact(registry: FleetRegistry) -> None:
    registry.put_artifact(ArtifactRecord("a" * 32, "k", "m", 2, "rpi4", "fp32", {}, b"k" * 32, 10, 0.0))


def test_second_concurrent_deployment_to_the_same_devices_is_refused(registry: FleetRegistry) -> None:
    _artifact(registry)
    for d in ("d1", "d2", "d3"):
        registry.add_device(d, profile="rpi4", public_key=KEY, broker_hash=None)
    registry.create_deployment(_deployment("dep-1", ["d1", "d2"]))
    with pytest.raises(ConflictError, match="dep-1"):
        registry.create_deployment(_deployment("dep-2", ["d2", "d3"]))
    # nothing of the refused deployment was written
    with pytest.raises(NotFoundError):
        registry.get_deployment("dep-2")
    registry.set_deployment_status("dep-1", "completed")
    registry.create_deployment(_deployment("dep-3", ["d2", "d3"]))
    rows = {r.device_id: r.state for r in registry.deployment_devices("dep-1")}
    assert rows["d2"] == "superseded" and rows["d1"] == "pending"


def test_only_one_process_claims_a_deployment(registry_url: str, registry: FleetRegistry) -> None:
    _artifact(registry)
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    registry.create_deployment(_deployment("dep-1", ["d1"]))
    other = other_process(registry_url)
    assert registry.claim_deployment("dep-1", "a", 5, now=10.0)
    assert not other.claim_deployment("dep-1", "b", 5, now=12.0)
    assert other.claim_deployment("dep-1", "b", 5, now=16.0)
    assert registry.get_deployment("dep-1").lease_owner == "b"
    assert registry.get_deployment("dep-1").status == DEP_RUNNING


def test_late_will_of_an_older_session_does_not_mark_a_live_device_offline(registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    live = StateReport(device_id="d1", online=True, session=5, ts=1.0, active=ActiveModel("m", 1, "committed"))
    old_will = StateReport(device_id="d1", online=False, session=4, ts=2.0)
    registry.write_ingest(IngestBatch(states=[live, old_will]), bucket_s=60)
    dev = registry.get_device("d1")
    assert dev.online and dev.active_version == 1
    registry.write_ingest(IngestBatch(states=[StateReport(device_id="d1", online=False, session=5, ts=3.0)]),
                          bucket_s=60)
    dev = registry.get_device("d1")
    assert not dev.online and dev.active_version == 1  # offline keeps the last known model
    kinds = [e.kind for e in registry.list_events()]
    assert kinds == ["device.online", "device.offline"]


def test_events_are_deduplicated(registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    ev = Event(device_id="d1", ts=1.0, event_id="e1", kind="lifecycle.committed")
    first = registry.write_ingest(IngestBatch(events=[ev]), bucket_s=60)
    again = registry.write_ingest(IngestBatch(events=[ev]), bucket_s=60)
    assert len(first) == 1 and again == []
    assert [e.kind for e in registry.list_events(device_id="d1")] == ["lifecycle.committed"]


def test_telemetry_is_downsampled_into_buckets_and_pruned(registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)

    def t(ts: float, p95: float, cpu: float) -> Telemetry:
        return Telemetry(device_id="d1", ts=ts, window_s=10, cpu_percent=cpu, memory_percent=50, rss_bytes=100,
                         disk_free_bytes=1, requests=10, errors=1, latency_ms={"p95": p95}, temperature_c=40)

    batch = IngestBatch(telemetry=[t(600.0, 10.0, 20.0), t(630.0, 30.0, 40.0), t(660.0, 5.0, 10.0)])
    registry.write_ingest(batch, bucket_s=60)
    series = registry.telemetry_series("d1")
    assert [s["bucket"] for s in series] == [600.0, 660.0]
    assert series[0]["samples"] == 2 and series[0]["cpu_percent"] == 30.0
    assert series[0]["p95_ms_max"] == 30.0 and series[0]["requests"] == 20
    dev = registry.get_device("d1")
    assert dev.p95_ms == 5.0 and dev.cpu_percent == 10.0  # the newest sample
    assert registry.prune(telemetry_before=650.0, events_before=0.0) == (1, 0)
    assert [s["bucket"] for s in registry.telemetry_series("d1")] == [660.0]


def test_tokens_audit_and_enrollment(registry: FleetRegistry) -> None:
    registry.add_token("ci", "h1", role="deploy")
    assert registry.token_owner("h1") == "ci"
    with pytest.raises(ConflictError):
        registry.add_token("ci", "h2", role="read")
    registry.revoke_token("ci")
    assert registry.token_owner("h1") is None
    registry.record_audit(actor="ci", action="deploy", target="all", params={"model": "m:1"}, outcome="ok")
    [a] = registry.list_audit()
    assert (a.actor, a.action, a.outcome, a.params["model"]) == ("ci", "deploy", "ok", "m:1")


def _telemetry(device_id: str, ts: float) -> Telemetry:
    return Telemetry(device_id=device_id, ts=ts, window_s=10, cpu_percent=10, memory_percent=50, rss_bytes=100,
                     disk_free_bytes=1, requests=1, errors=0, latency_ms={"p95": 2.0})


def test_telemetry_marks_a_device_never_seen_in_a_state_report_online(registry: FleetRegistry) -> None:
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    registry.write_ingest(IngestBatch(telemetry=[_telemetry("d1", 100.0)]), bucket_s=60, now=105.0)
    dev = registry.get_device("d1")
    assert dev.online and dev.last_seen == 105.0
    assert [e.kind for e in registry.list_events(device_id="d1")] == ["device.online"]
    # once a Last Will was applied, presence follows the session rule: late telemetry does not revive it
    registry.write_ingest(IngestBatch(states=[StateReport(device_id="d1", online=False, session=1, ts=110.0)]),
                          bucket_s=60, now=110.0)
    registry.write_ingest(IngestBatch(telemetry=[_telemetry("d1", 109.0)]), bucket_s=60, now=111.0)
    assert not registry.get_device("d1").online


def test_state_of_an_unregistered_device_is_applied_when_it_is_registered(registry: FleetRegistry) -> None:
    live = StateReport(device_id="d1", online=True, session=3, ts=1.0, active=ActiveModel("m", 2, "committed"),
                       agent_version="9.9")
    older_will = StateReport(device_id="d1", online=False, session=2, ts=2.0)
    registry.write_ingest(IngestBatch(unregistered_states=[live]), bucket_s=60, now=50.0)
    registry.write_ingest(IngestBatch(unregistered_states=[older_will]), bucket_s=60, now=51.0)  # ignored
    registry.add_device("d1", profile="rpi4", public_key=KEY, broker_hash=None)
    assert not registry.get_device("d1").online
    with registry.tx() as tx:
        assert registry.adopt_presence("d1", tx=tx)
    dev = registry.get_device("d1")
    assert (dev.online, dev.session, dev.last_seen, dev.active_model, dev.active_version, dev.agent_version) == (
        True, 3, 50.0, "m", 2, "9.9")
    with registry.tx() as tx:
        assert not registry.adopt_presence("d1", tx=tx)  # used once
    registry.write_ingest(IngestBatch(unregistered_states=[live]), bucket_s=60, now=60.0)
    assert registry.prune(telemetry_before=0.0, events_before=70.0) is not None
    with registry.tx() as tx:
        assert not registry.adopt_presence("d1", tx=tx)  # pruned with the events' retention


def test_every_deployment_status_is_set_somewhere_and_is_holding_or_finished() -> None:
    import re

    import server.registry.fleet as fleet
    import server.registry.rollouts as rollouts

    names = {k: v for k, v in vars(rollouts).items() if k.startswith("DEP_")}
    root = Path(rollouts.__file__).resolve().parents[1]
    owners = {Path(str(m.__file__)).resolve() for m in (fleet, rollouts)}  # where they are defined and re-exported
    elsewhere = "".join(p.read_text() for p in root.rglob("*.py") if p.resolve() not in owners)
    assert not [k for k in names if not re.search(rf"\b{k}\b", elsewhere)], "a status nothing ever sets"
    holding, finished = set(rollouts.HOLDING_STATUSES), set(rollouts.FINISHED_STATUSES)
    assert set(names.values()) == holding | finished and not holding & finished
