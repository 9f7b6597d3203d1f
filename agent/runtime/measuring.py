"""The device's own latency figures: the off-path benchmark after warm-up and at commit, reported on ``up/measure``.

The benchmark times the candidate in its own slot before it serves (the serving model keeps running on
the HTTP threads meanwhile), on a thread at nice 19 (``at_low_priority``), at most
``lifecycle.benchmark_cpu_share`` of one core and ``benchmark_max_s`` of wall time. A failure here never
fails the update: the health check already judged the model; a figure that cannot be taken is logged and
not sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.core.serving import percentile
from agent.errors import EdgeError
from agent.protocol.measurement import Measurement
from agent.protocol.messages import HealthSpec, ModelRef, encode
from agent.protocol.topics import Channel, device_topic
from agent.runtime.parts import AgentParts, _peak_rss_bytes, _ref_text, _window
from agent.runtime.telemetry import read_cpu_context

log = logging.getLogger("agent")
T = TypeVar("T")
#: the nice value of the thread that benchmarks (and, for a probe, loads): serving threads keep priority
BENCHMARK_NICE = 19


def lower_this_thread(*, idle: bool = False) -> str:
    """Lower the calling thread's priority (Linux: per thread); what it got: ``"idle"``, ``"nice"`` or ``""``.

    ``idle``: ``SCHED_IDLE`` (the kernel runs the thread only when no normal thread wants that CPU; an
    unprivileged thread may always move itself there), else nice ``BENCHMARK_NICE``. Threads it starts
    inherit the policy.
    """
    tid = threading.get_native_id()
    if idle and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, BENCHMARK_NICE)
        return "nice"
    return ""


def at_low_priority(fn: Callable[[], T], *, idle: bool = False) -> T:
    """Run ``fn`` on a thread of its own at low priority (``lower_this_thread``) and wait for it.

    Linux keeps a nice value and a scheduling policy per thread, so the serving threads (the HTTP server's,
    at the process's priority) win the CPU whenever they want it; elsewhere the call runs at normal priority.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        lower_this_thread(idle=idle)
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread, re-raised there
            box["error"] = exc

    worker = threading.Thread(target=run, name="edgefleet-benchmark", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


class Measuring(AgentParts):
    """Benchmarks a loaded model and publishes what it measured."""

    def _benchmark(
        self,
        model: Any,
        health: HealthSpec,
        *,
        ref: ModelRef,
        artifact_id: str | None,
        variant: str | None,
        source: str = "warmup",
        probe_id: str | None = None,
    ) -> Measurement | None:
        """Time ``model`` off the serving path and publish the figures; None when off or it could not run."""
        started = time.monotonic()
        timings = self._time(model, health, ref=ref)
        if not timings:
            return None
        return self._report_timings(model, timings, ref=ref, artifact_id=artifact_id, variant=variant, source=source,
                                    probe_id=probe_id, seconds=time.monotonic() - started)

    def _time(self, model: Any, health: HealthSpec, *, ref: ModelRef, share: float = 1.0) -> list[float]:
        """``share`` of the configured runs and wall time, at low priority; [] when off or the model cannot run."""
        cfg = self.config.lifecycle
        runs = max(1, round(cfg.benchmark_runs * share)) if cfg.benchmark_runs > 0 else 0
        if runs <= 0:
            return []
        try:
            return at_low_priority(lambda: self.host.benchmark(
                model, health, runs=runs, max_s=cfg.benchmark_max_s * share, cpu_share=cfg.benchmark_cpu_share
            ))
        except EdgeError as exc:
            log.warning("benchmark of %s failed: %s", _ref_text(ref), exc.message)
            return []

    def _report_timings(
        self, model: Any, timings: list[float], *, ref: ModelRef, artifact_id: str | None, variant: str | None,
        source: str, probe_id: str | None, seconds: float,
    ) -> Measurement:
        timings = sorted(timings)
        providers = getattr(model, "providers", ()) or ()
        context = read_cpu_context()
        measurement = Measurement(
            device_id=self.device_id,
            ts=self.clock(),
            model=ref.name,
            version=ref.version,
            source=source,
            runs=len(timings),
            p50_ms=round(percentile(timings, 50), 4),
            p95_ms=round(percentile(timings, 95), 4),
            min_ms=round(timings[0], 4),
            artifact_id=artifact_id,
            variant=variant,
            probe_id=probe_id,
            peak_rss_bytes=_peak_rss_bytes(),
            execution_provider=(providers[0] if providers else getattr(model, "backend", None) or None),
            governor=context.governor,
            cpu_mhz=context.cpu_mhz,
            temperature_c=context.temperature_c,
            load_avg=context.load_avg,
            seconds=round(seconds, 3),
        )
        if source == "warmup":  # what this version measured as installed: probation's fallback baseline
            self._measured[ref] = measurement
        self._send_measurement(measurement)
        return measurement

    def _report_service(self, ref: ModelRef, artifact_id: str | None, variant: str | None, since: float) -> None:
        """What real traffic measured on ``ref`` since ``since`` (probation), as a ``service`` measurement."""
        stats = _window(self.host.stats(since=since, version=ref.version, name=ref.name))
        if not stats.requests or stats.p50_ms is None or stats.p95_ms is None:
            return
        self._send_measurement(
            Measurement(
                device_id=self.device_id,
                ts=self.clock(),
                model=ref.name,
                version=ref.version,
                source="service",
                runs=stats.requests,
                p50_ms=round(stats.p50_ms, 4),
                p95_ms=round(max(stats.p95_ms, stats.p50_ms), 4),
                artifact_id=artifact_id,
                variant=variant,
            )
        )

    def _send_measurement(self, measurement: Measurement) -> None:
        log.info(
            "measured",
            extra={"fields": {
                "model": f"{measurement.model}:{measurement.version}", "source": measurement.source,
                "variant": measurement.variant, "runs": measurement.runs, "p50_ms": measurement.p50_ms,
                "p95_ms": measurement.p95_ms,
            }},
        )
        if self.link is None:
            return
        try:
            self.link.publish(device_topic(self.device_id, Channel.MEASUREMENT), encode(measurement))
        except EdgeError as exc:
            log.warning("publish failed: %s", exc.message)
