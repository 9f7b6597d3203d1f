"""The agent's reports: events (rate-limited errors), the retained StateReport, telemetry, the Will."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from agent import __version__
from agent.core.device import DeviceCore
from agent.core.journal import State
from agent.errors import EdgeError, StorageError
from agent.protocol.messages import ActiveModel, ModelRef, StateReport, Telemetry, encode
from agent.protocol.messages import Event as WireEvent
from agent.protocol.topics import Channel, device_topic
from agent.runtime.parts import AgentParts, _ref, _ref_dict, _ref_text, _window
from agent.runtime.store import KeptVersion

log = logging.getLogger("agent")


class Reporting(AgentParts, DeviceCore):
    """Publishing: what the server hears from the agent."""

    def _will(self, session: int) -> tuple[str, bytes]:
        report = StateReport(
            device_id=self.device_id,
            online=False,
            session=session,
            ts=self.clock(),
            profile=self.config.profile,
            arch=self.arch,
            agent_version=__version__,
            public_key=self.public_key,
        )
        return device_topic(self.device_id, Channel.STATE), encode(report)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.link is None:
            return
        try:
            self.link.publish(topic, payload, retain=retain)
        except EdgeError as exc:
            log.warning("publish failed: %s", exc.message)

    def _emit(self, event: WireEvent) -> None:
        severity, kind = event.severity, event.kind
        level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        fields: dict[str, Any] = {"kind": kind, "model": _ref_text(event.model)}
        fields.update({k: v for k, v in (("code", event.code), ("deployment_id", event.deployment_id)) if v})
        if event.data:
            fields["data"] = dict(event.data)
        log.log(level, event.message or kind, extra={"fields": fields})
        self._publish(device_topic(self.device_id, Channel.EVENT), encode(event))

    def _serving(self) -> ModelRef | None:
        return _ref(self.host.active)

    def _committed_install(self) -> KeptVersion | None:
        committed = self.machine.record.committed
        return self.store.find(committed, committed_only=True) if committed is not None else None

    def _state_report(self, *, online: bool = True) -> StateReport:
        record = self.machine.record
        active_model = self.host.active
        active: ActiveModel | None = None
        if active_model is not None:
            ref = active_model.ref
            on_probation = self.machine.state is State.PROBATION and ref == record.target
            kept = self.store.find(ref)
            active = ActiveModel(
                name=ref.name,
                version=ref.version,
                state="probation" if on_probation else "committed",
                artifact_id=kept.artifact_id if kept else None,
                variant=kept.variant if kept else None,
            )
        name = record.committed.name if record.committed else (active.name if active else None)
        kept_versions = tuple(sorted({v.ref.version for v in self.store.kept(name)})) if name else ()
        return StateReport(
            device_id=self.device_id,
            online=online,
            session=self.link.session if self.link else 0,
            ts=self.clock(),
            lifecycle=record.state.value,
            active=active,
            target=record.target,
            kept=kept_versions,
            last_seq=record.last_seq,
            desired_expires_at=self.trusted.desired_expires_at,
            profile=self.config.profile,
            arch=self.arch,
            agent_version=__version__,
            public_key=self.public_key,
        )

    def _publish_state(self) -> None:
        """The retained StateReport: in full as the birth of each connection, then only what changes.

        The static facts (profile, arch, agent version, public key) travel in the birth report and
        the Last Will; later reports leave them out (the server keeps the last known values), and a
        report identical to the last one sent (timestamp aside) is not sent again. At fleet size
        this halves a rollout's report traffic (docs/benchmarks.md, bench_fleet).
        """
        self._published_lifecycle = self.machine.state
        report = self._state_report()
        slim = replace(report, profile=None, arch=None, agent_version=None, public_key=None)
        same = encode(replace(slim, ts=0.0))
        connected = self.link is not None and self.link.connected
        if connected and same != self._last_state:  # before connecting: the birth on Connected says it
            wire = slim if self._birth_sent else report
            self._publish(device_topic(self.device_id, Channel.STATE), encode(wire), retain=True)
            self._birth_sent, self._last_state = True, same
        status = report.to_dict() | {
            "pid": os.getpid(),
            "committed": _ref_dict(self.machine.record.committed),
            "http": self.http_url,
        }
        try:
            self.store.write_status(status)
        except StorageError as exc:
            log.debug("cannot write status.json: %s", exc.message)

    def _publish_telemetry(self) -> None:
        sample = self.sampler.sample()
        host_now = self.host.now()
        stats = _window(self.host.stats(since=self._telemetry_since))
        self._telemetry_since = host_now
        now = self.monotonic()
        window_s, self._telemetry_window_start = now - self._telemetry_window_start, now
        report = self._state_report()
        latency = {
            k: v for k, v in (("p50", stats.p50_ms), ("p95", stats.p95_ms), ("p99", stats.p99_ms)) if v is not None
        }
        telemetry = Telemetry(
            device_id=self.device_id,
            ts=self.clock(),
            window_s=round(window_s, 3),
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            rss_bytes=sample.rss_bytes,
            disk_free_bytes=sample.disk_free_bytes,
            requests=stats.requests,
            errors=stats.errors,
            latency_ms=latency,
            temperature_c=sample.temperature_c,
            model=report.active,
            lifecycle=report.lifecycle,
            arch=self.arch,
        )
        self._publish(device_topic(self.device_id, Channel.TELEMETRY), encode(telemetry))
