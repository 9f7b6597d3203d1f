"""Prometheus text exposition (format 0.0.4) for ``/metrics``.

Fleet gauges (devices by state, versions, rollout progress, telemetry aggregates) are read
from the registry at scrape time, so every server process reports the same fleet; counters
(messages ingested and rejected, chunks and bytes published) are this process's own, as
Prometheus expects of counters.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from server.measured import by_build, profile_budgets
from server.registry.fleet import FleetRegistry


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[Mapping[str, object], float]] = []

    def add(self, value: float | int | None, **labels: object) -> Family:
        if value is not None:
            self.samples.append((labels, float(value)))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(lbl)} {v:g}" for lbl, v in self.samples]
        return "\n".join(lines)


class PublishStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks: Counter[str] = Counter()
        self.chunk_bytes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    def chunk_sent(self, size: int, broadcast: bool) -> None:
        mode = "broadcast" if broadcast else "unicast"
        with self.lock:
            self.chunks[mode] += 1
            self.chunk_bytes[mode] += size

    def published(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.messages[kind] += n


def render_metrics(
    registry: FleetRegistry,
    *,
    ingest: Any | None = None,
    publish: PublishStats | None = None,
    quota: Any | None = None,
    extra: Iterable[Family] = (),
) -> str:
    counts = registry.fleet_counts()
    fams: list[Family] = []
    devices = Family("edgefleet_devices", "gauge", "Registered devices by status, profile, online and lifecycle state")
    for r in counts["devices"]:
        devices.add(r["n"], status=r["status"], profile=r["profile"], online=str(bool(r["online"])).lower(),
                    lifecycle=r["lifecycle"])
    fams.append(devices)
    versions = Family("edgefleet_devices_running", "gauge", "Active devices by the model version they serve")
    for r in counts["versions"]:
        versions.add(r["n"], model=r["model"], version=r["version"])
    fams.append(versions)
    rollout = Family("edgefleet_rollout_devices", "gauge", "Devices of live rollouts by their phase")
    for r in counts["rollouts"]:
        rollout.add(r["n"], deployment=r["deployment_id"], status=r["status"], phase=r["state"])
    fams.append(rollout)
    deps = Family("edgefleet_deployments", "gauge", "Deployments by status")
    for r in counts["deployment_status"]:
        deps.add(r["n"], status=r["status"])
    fams.append(deps)
    t = counts["telemetry"]
    fams.append(Family("edgefleet_fleet_cpu_percent_avg", "gauge", "Mean CPU of online devices").add(t["cpu"]))
    fams.append(Family("edgefleet_fleet_memory_percent_avg", "gauge", "Mean memory of online devices").add(t["mem"]))
    fams.append(Family("edgefleet_fleet_latency_p95_ms_avg", "gauge",
                       "Mean of online devices' p95 inference latency").add(t["p95"]))
    fams.append(Family("edgefleet_fleet_latency_p95_ms_max", "gauge",
                       "Worst online device's p95 inference latency").add(t["p95max"]))
    fams.append(Family("edgefleet_fleet_temperature_c_max", "gauge", "Hottest online device").add(t["tmax"]))
    fams.append(Family("edgefleet_fleet_inference_requests", "gauge",
                       "Inference requests in the devices' last telemetry windows").add(t["req"]))
    fams.append(Family("edgefleet_fleet_inference_errors", "gauge",
                       "Inference errors in the devices' last telemetry windows").add(t["err"]))
    fams.append(Family("edgefleet_enrollments_pending", "gauge", "Enrollment requests awaiting approval")
                .add(counts["pending_enrollments"]))
    if ingest is not None:
        with ingest.lock:
            rec = Family("edgefleet_ingest_messages_total", "counter", "Device messages accepted, by type")
            for kind, n in sorted(ingest.received.items()):
                rec.add(n, type=kind)
            rej = Family("edgefleet_ingest_rejected_total", "counter", "Device messages rejected, by error code")
            for code, n in sorted(ingest.rejected.items()):
                rej.add(n, code=code)
            fams += [rec, rej,
                     Family("edgefleet_ingest_batches_total", "counter", "Ingest transactions").add(ingest.batches),
                     Family("edgefleet_ingest_seconds_total", "counter", "Time spent writing ingest batches")
                     .add(ingest.batch_seconds)]
    if publish is not None:
        with publish.lock:
            ch = Family("edgefleet_chunks_published_total", "counter", "Artifact chunks published, by mode")
            by = Family("edgefleet_chunk_bytes_published_total", "counter", "Artifact chunk bytes published, by mode")
            for mode in ("broadcast", "unicast"):
                ch.add(publish.chunks[mode], mode=mode)
                by.add(publish.chunk_bytes[mode], mode=mode)
            msg = Family("edgefleet_messages_published_total", "counter", "Signed control messages published")
            for kind, n in sorted(publish.messages.items()):
                msg.add(n, kind=kind)
            fams += [ch, by, msg]
    if quota is not None:
        with quota.lock:
            thr = Family("edgefleet_quota_throttled_total", "counter",
                         "Device messages dropped or cleared over a per-device quota, by quota")
            for name in ("events", "bytes", "chunk_resends", "retained"):
                thr.add(quota.throttled[name], quota=name)
            fams.append(thr)
    fams += delta_metrics(registry)
    fams += measured_metrics(registry)
    fams += list(extra)
    return "\n".join(f.render() for f in fams) + "\n"


def measured_metrics(registry: FleetRegistry) -> list[Family]:
    """Device-measured latency per model version, profile and variant (``server.measured``), budget flag included."""
    p50 = Family("edgefleet_measured_latency_p50_ms", "gauge",
                 "Median over a profile's devices of their own measured p50 latency, by build variant")
    p95 = Family("edgefleet_measured_latency_p95_ms", "gauge",
                 "Median over a profile's devices of their own measured p95 latency, by build variant")
    n = Family("edgefleet_measured_devices", "gauge", "Devices that reported a latency measurement")
    over = Family("edgefleet_measured_over_budget", "gauge",
                  "1 when the measured p95 exceeds the profile's latency_budget_ms")
    for model, version, f in by_build(registry.all_measurements(), profile_budgets()):
        labels = {"model": model, "version": version, "profile": f.profile, "variant": f.variant, "kind": f.kind}
        p50.add(f.p50_ms, **labels)
        p95.add(f.p95_ms, **labels)
        n.add(f.devices, **labels)
        over.add(int(f.over_budget), **labels)
    return [p50, p95, n, over]


def delta_metrics(registry: FleetRegistry) -> list[Family]:
    """Delta outcomes the devices reported (events still retained): applied vs fell back, and bytes saved."""
    by = registry.delta_outcomes()
    updates = Family("edgefleet_delta_updates", "gauge", "Deploys offered a delta, by outcome (retained events)")
    saved = Family("edgefleet_delta_bytes_saved", "gauge", "Artifact bytes devices did not fetch thanks to deltas")
    for outcome in ("applied", "fallback"):
        r = by.get(f"delta.{outcome}")
        updates.add(r["n"] if r else 0, outcome=outcome)
    r = by.get("delta.applied")
    saved.add(r["saved"] if r else 0)
    return [updates, saved]
