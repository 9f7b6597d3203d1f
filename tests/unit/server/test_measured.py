"""Device measurements: the registry owner on a real SQLite file, the per-profile aggregation, /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.measurement import Measurement
from server.measured import aggregate, measured_latency
from server.metrics import render_metrics
from server.registry.db import Database
from server.registry.fleet import FleetRegistry, IngestBatch
from server.registry.measurements import MeasurementRegistry

KEY = "A" * 43 + "="


def m(device: str, p50: float, *, variant: str = "int8-dynamic", source: str = "warmup", p95: float | None = None,
      version: int = 1) -> Measurement:
    return Measurement(device_id=device, ts=1.0, model="digits", version=version, source=source, runs=20,
                       p50_ms=p50, p95_ms=p95 if p95 is not None else p50 * 1.2, variant=variant,
                       load_avg=(0.5, 0.5, 0.5))


@pytest.fixture
def registry(tmp_path: Path) -> FleetRegistry:
    r = FleetRegistry(Database(tmp_path / "registry.db"))
    r.migrate()
    for i in range(3):
        r.add_device(f"pi-{i}", profile="rpi4", public_key=KEY, broker_hash=None)
    r.add_device("x86-0", profile="x86", public_key=KEY, broker_hash=None)
    return r


def test_ingest_keeps_the_latest_figure_per_device_build_variant_and_source(registry: FleetRegistry) -> None:
    registry.write_ingest(IngestBatch(measurements=[m("pi-0", 10.0), m("pi-1", 12.0), m("ghost", 1.0)]), bucket_s=60)
    registry.write_ingest(IngestBatch(measurements=[m("pi-0", 11.0), m("pi-0", 9.0, source="service")]), bucket_s=60)
    rows = registry.measurements("digits", 1)
    assert sorted((r.device_id, r.source, r.p50_ms) for r in rows) == [
        ("pi-0", "service", 9.0), ("pi-0", "warmup", 11.0), ("pi-1", "warmup", 12.0)]
    assert {r.profile for r in rows} == {"rpi4"}  # copied from the device: an unknown device's figure is dropped
    assert rows[0].context["load_avg"] == [0.5, 0.5, 0.5]
    assert registry.measurements("digits", 1, sources=("service",))[0].device_id == "pi-0"
    assert registry.measurements("digits", 2) == []


def test_the_owner_alone_reads_what_the_fleet_registry_wrote(tmp_path: Path, registry: FleetRegistry) -> None:
    registry.record_measurements([m("pi-0", 10.0)])
    alone = MeasurementRegistry(Database(tmp_path / "registry.db"))
    assert [r.p50_ms for r in alone.measurements("digits")] == [10.0]


def test_aggregate_per_profile_median_spread_and_budget(registry: FleetRegistry) -> None:
    registry.record_measurements([
        m("pi-0", 10.0, p95=12.0), m("pi-1", 12.0, p95=30.0), m("pi-2", 20.0, p95=31.0),
        m("pi-0", 8.0, p95=9.0, variant="fp32"), m("x86-0", 2.0, p95=2.5),
        m("pi-1", 40.0, source="service", p95=45.0),
    ])
    figures = {(f.profile, f.variant, f.kind): f for f in aggregate(registry.measurements("digits"), {"rpi4": 25.0})}
    pi = figures[("rpi4", "int8-dynamic", "bench")]
    assert (pi.devices, pi.p50_ms, pi.p95_ms, pi.p50_min_ms, pi.p50_max_ms) == (3, 12.0, 30.0, 10.0, 20.0)
    assert pi.spread == pytest.approx((20.0 - 10.0) / 12.0, abs=1e-4)
    assert pi.over_budget and pi.budget_ms == 25.0
    assert not figures[("rpi4", "fp32", "bench")].over_budget
    assert figures[("rpi4", "int8-dynamic", "service")].devices == 1  # real traffic is its own kind
    assert figures[("x86", "int8-dynamic", "bench")].budget_ms is None


def test_a_probe_figure_wins_over_the_same_devices_warmup() -> None:
    rows = [_Row("d", "p", "v", "warmup", 50.0), _Row("d", "p", "v", "probe", 5.0), _Row("e", "p", "v", "warmup", 7.0)]
    (fig,) = aggregate(rows)
    assert (fig.devices, fig.p50_min_ms, fig.p50_max_ms) == (2, 5.0, 7.0)
    assert measured_latency(rows, "p") == {"v": 6.0}
    assert measured_latency(rows, "other") == {}


def test_metrics_export_measured_latency_and_the_budget_flag(registry: FleetRegistry) -> None:
    registry.record_measurements([m("pi-0", 10.0), m("pi-1", 14.0)])
    text = render_metrics(registry)
    assert 'edgefleet_measured_latency_p50_ms{model="digits",version="1",profile="rpi4",variant="int8-dynamic",' \
           'kind="bench"} 12' in text
    assert "# TYPE edgefleet_measured_over_budget gauge" in text
    assert 'edgefleet_measured_devices{model="digits",version="1",profile="rpi4"' in text


class _Row:
    def __init__(self, device_id: str, profile: str, variant: str, source: str, p50: float) -> None:
        self.device_id, self.profile, self.variant, self.source = device_id, profile, variant, source
        self.p50_ms, self.p95_ms = p50, p50


def test_simulator_stand_in_figures_follow_the_profile_model() -> None:
    import random

    from server.simulator.measure import stand_in

    def p50(profile: str, variant: str, device: str = "sim-1") -> float:
        return stand_in(device_id=device, profile=profile, model="m", version=1, variant=variant, base_ms=10.0,
                        ts=0.0, rng=random.Random(1)).p50_ms

    assert p50("raspberry-pi-5", "fp32") < p50("raspberry-pi-4", "fp32")
    assert p50("raspberry-pi-4", "int8-dynamic") < p50("raspberry-pi-4", "fp32")
    assert p50("jetson-orin-nano", "fp16") < p50("jetson-orin-nano", "fp32")
    assert p50("raspberry-pi-4", "fp32", "sim-1") != p50("raspberry-pi-4", "fp32", "sim-2")  # per-device spread
    m = stand_in(device_id="sim-1", profile="x", model="m", version=1, variant=None, base_ms=1.0, ts=0.0)
    assert m.p95_ms >= m.p50_ms and m.source == "warmup"


def test_status_flags_a_build_measured_over_its_profiles_budget(tmp_path: Path) -> None:
    from server.artifacts import ArtifactStore
    from server.builds import StaticBuilds
    from server.config import ServerConfig
    from server.service import FleetService

    r = FleetRegistry(Database(tmp_path / "registry.db"))
    r.migrate()
    r.add_device("pi-slow", profile="raspberry-pi-4", public_key=KEY, broker_hash=None)
    r.add_device("pi5", profile="raspberry-pi-5", public_key=KEY, broker_hash=None)
    r.record_measurements([m("pi-slow", 450.0, p95=520.0), m("pi5", 20.0, p95=25.0)])  # budgets: 400 and 200 ms
    service = FleetService(ServerConfig(home=tmp_path), r, builds=StaticBuilds(),
                           artifacts=ArtifactStore(tmp_path / "artifacts", r), profiles=None)
    (flag,) = service.measured_over_budget()
    assert (flag["profile"], flag["p95_ms"], flag["budget_ms"], flag["model"]) == ("raspberry-pi-4", 520.0, 400.0,
                                                                                  "digits")


def test_model_show_prints_the_measured_figures_beside_the_estimate(registry: FleetRegistry, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from server import model_ops
    from server.commands import models as model_commands

    registry.record_measurements([m("pi-0", 10.0, p95=12.0), m("pi-1", 14.0, p95=500.0)])
    catalog = SimpleNamespace(db=Database(tmp_path / "registry.db"))
    figures = model_ops.measured_figures(catalog, "digits", 1)
    assert [(f["profile"], f["variant"], f["devices"], f["p50_ms"]) for f in figures] == [
        ("rpi4", "int8-dynamic", 2, 12.0)]
    assert model_ops.measured_figures(catalog, "digits", 2) == []
    out = Console(width=200, record=True)
    build = SimpleNamespace(profile="rpi4", variant="int8-dynamic", provenance={"latency_ms": 3.5})
    saved, model_commands.console = model_commands.console, out
    try:
        model_commands._print_measured(figures, [build])
    finally:
        model_commands.console = saved
    text = out.export_text()
    assert "measured on devices" in text and "12.00" in text and "3.50" in text and "rpi4" in text
