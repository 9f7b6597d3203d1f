"""One simulated device: the agent's protocol and update lifecycle, on a paho client driven by a shared loop.

Theory of operation
    A ``SimDevice`` is what ``agent.runtime.agent.Agent`` is, minus the disk and the inference
    runtime. The parts that decide are the real ones: signed desired states and commands are
    opened with ``agent.protocol.envelope`` (signature, recipient, freshness, replay, downgrade),
    the data key is unwrapped with the device's own X25519 key, every chunk is authenticated and
    decrypted with ``ChunkOpener`` and stored through ``agent.core.reassembly.Reassembly``, and
    every transition is made by ``agent.core.lifecycle.UpdateMachine``, whose effects this class
    executes in order, as the agent's executor table does. Reports (events, retained state after
    each transition, telemetry) are the agent's, with the same slimming rules.

    What is simulated, and said so in ``--help`` and docs/simulator.md:
      * storage: the journal and kept versions live in memory; the artifact is never written out
        (``StreamingSink`` hashes and inflates it as it arrives, so both digests are still checked);
      * inference: a stand-in. "Loading" a version checks nothing more; its health check fails for
        versions listed in ``fail_versions`` (a latency failure, as a too-slow model would) and
        passes otherwise; probation statistics are synthetic (``requests_per_s`` requests at
        ``latency_ms`` p95, no errors), judged by the real probation policy;
      * the system sampler: telemetry numbers are constant placeholders.

    Threads: none of its own. The shard loop that owns the device calls ``on_*`` from paho's
    callbacks and ``tick`` a few times a second; nothing here blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import __version__
from agent.core.device import DeviceCore
from agent.core.executor import feed
from agent.core.health import ProbationPolicy, WindowStats
from agent.core.journal import Failure, JournalRecord, State
from agent.core.lifecycle import (
    DownloadComplete,
    Event,
    Failed,
    RolledBack,
    Sample,
    Seen,
    UpdateMachine,
    Verified,
    WarmedUp,
)
from agent.core.reassembly import Reassembly, Taken, progress_due, take_chunk
from agent.errors import (
    EdgeError,
    HealthCheckError,
    IntegrityError,
    LifecycleError,
    TopicError,
)
from agent.protocol.delta import DeltaInfo, delta_offer
from agent.protocol.envelope import ChunkOpener, TrustAnchor, unwrap_key
from agent.protocol.events import EventKind, error_kind
from agent.protocol.measurement import Measurement
from agent.protocol.messages import (
    ActiveModel,
    ArtifactInfo,
    ChunkRequest,
    Command,
    DesiredState,
    EnrollRequest,
    HealthSpec,
    ModelRef,
    RuntimeSpec,
    StateReport,
    Telemetry,
    encode,
)
from agent.protocol.messages import Event as WireEvent
from agent.protocol.probe import ProbeRequest
from agent.protocol.topics import Channel, device_down_filter, device_topic, parse_topic
from server.simulator.measure import stand_in
from server.simulator.sink import StreamingSink

log = logging.getLogger("edgefleet.simulator")

SIM_AGENT_VERSION = f"{__version__}+sim"
SIM_ARCH = "simulated"
MILESTONES = (EventKind.DESIRED_ACCEPTED, EventKind.DOWNLOAD_STARTED, EventKind.DOWNLOAD_COMPLETED,
              EventKind.LIFECYCLE_PROBATION, EventKind.LIFECYCLE_COMMITTED, EventKind.LIFECYCLE_ROLLED_BACK)


@dataclass(frozen=True)
class SimSettings:
    """How every simulated device behaves (the knobs of ``edgefleet simulate``)."""

    profile: str = "raspberry-pi-4"
    #: versions whose warm-up health check fails (latency over budget): they are rolled back
    fail_versions: frozenset[int] = frozenset()
    #: synthetic traffic during probation, and its p95 latency
    requests_per_s: float = 5.0
    latency_ms: float = 2.0
    #: 0 = no telemetry
    telemetry_s: float = 30.0
    chunk_timeout_s: float = 5.0
    chunk_timeout_max_s: float = 60.0
    progress_interval_s: float = 5.0
    probation_check_s: float = 0.5
    keep_versions: int = 3
    clock_skew_s: float = 300.0
    max_artifact_bytes: int = 1 << 30


@dataclass
class _Kept:
    ref: ModelRef
    artifact_id: str | None
    variant: str | None
    health: HealthSpec
    runtime: RuntimeSpec
    committed: bool = False
    committed_order: int = 0  # the n-th commit (the agent's store orders kept versions by commit time)
    sha256: str = ""  # the model file's digest, from the deploy (a delta's base is named by it)


@dataclass
class _Download:
    target: ModelRef
    desired: DesiredState
    info: ArtifactInfo
    opener: ChunkOpener
    reassembly: Reassembly
    sink: StreamingSink
    last_new_at: float
    timeout: float
    last_progress_at: float
    last_progress_fraction: float = 0.0
    complete: bool = False
    artifact_id: str = ""  # the deploy's full artifact (the transfer may be its delta: ``info``)


@dataclass
class Counters:
    """What one device did (read by the loop for the status view; plain ints, no locking needed)."""

    chunks: int = 0
    duplicate_chunks: int = 0
    dropped_chunks: int = 0
    published: int = 0
    published_bytes: int = 0
    connects: int = 0
    retries: int = 0
    measurements: int = 0
    #: wall-clock times of the last update's milestones (for the timeline in ``edgefleet simulate --json``)
    milestones: dict[str, float] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SimShared:
    """What every device of one simulated fleet shares: the server's trust anchor, the settings, the clocks."""

    trust: TrustAnchor
    settings: SimSettings
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


class SimDevice(DeviceCore):
    """One simulated device: ``device_id`` with its X25519 ``key``, in a fleet that shares ``shared``."""

    def __init__(self, device_id: str, *, key: X25519PrivateKey, shared: SimShared) -> None:
        settings = shared.settings
        DeviceCore.__init__(self, device_id, shared.trust, skew=settings.clock_skew_s, clock=shared.clock,
                            monotonic=shared.monotonic)
        self.key = key
        self.trust = shared.trust
        self.settings = settings
        self.public_key = key.public_key().public_bytes_raw()
        self.client: mqtt.Client | None = None
        self.session = 0
        self.online = False
        self.counters = Counters()
        self.active: ModelRef | None = None
        self._kept: dict[ModelRef, _Kept] = {}
        self._desired: dict[str, DesiredState] = {}
        self._download: _Download | None = None
        self._candidate: ModelRef | None = None
        self._standby: ModelRef | None = None
        self._commits = 0
        self._state_dirty = False
        self._telemetry_start = 0.0

    # -- connection (called by the shard loop) ------------------------------------------------------------

    def will(self, session: int) -> tuple[str, bytes]:
        report = StateReport(
            device_id=self.device_id, online=False, session=session, ts=self.clock(),
            profile=self.settings.profile, arch=SIM_ARCH, agent_version=SIM_AGENT_VERSION,
            public_key=_b64(self.public_key),
        )
        return device_topic(self.device_id, Channel.STATE), encode(report)

    def on_connected(self, phase: float) -> None:
        """CONNACK accepted: subscribe, birth, enroll (fresh device), resume a transfer."""
        self.online = True
        self.counters.connects += 1
        assert self.client is not None
        self.client.subscribe(device_down_filter(self.device_id), qos=1)
        d = self._download
        if d is not None and d.info.topic:
            self.client.subscribe(d.info.topic, qos=1)
        self._birth_sent = False
        self._last_state = None
        self._publish_state()
        if self.machine.record.last_seq == 0:
            enroll = EnrollRequest(
                device_id=self.device_id, public_key=self.public_key, profile=self.settings.profile,
                ts=self.clock(), agent_version=SIM_AGENT_VERSION, arch=SIM_ARCH,
            )
            self._publish(Channel.ENROLL, encode(enroll))
        if d is not None and not d.complete:
            self._request_missing(d, "resume")
        now = self.monotonic()
        self._telemetry_start = now
        self._telemetry_next = now + self.settings.telemetry_s * (0.5 + phase)

    def on_disconnected(self) -> None:
        self.online = False

    def farewell(self) -> tuple[str, bytes]:
        """The retained offline report a clean shutdown leaves (the Will covers an unclean one)."""
        report = replace(self._state_report(full=True), online=False)
        return device_topic(self.device_id, Channel.STATE), encode(report)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return
        try:
            if parsed.channel in (Channel.CHUNK, Channel.ARTIFACT):
                self._on_chunk(payload)
            elif parsed.device_id != self.device_id:
                return
            elif parsed.channel is Channel.DESIRED:
                if payload:
                    self._on_desired(payload)
            elif parsed.channel is Channel.COMMAND:
                self._on_command(payload)
        except EdgeError as exc:  # an unexpected edge: report, keep going (as the agent does)
            log.warning("%s: unhandled %s: %s", self.device_id, exc.code, exc.message)
            self._event(error_kind(exc.code), severity="warning", code=exc.code, message=exc.message)
        self._after_events()

    def tick(self, now: float) -> None:
        """Timers: chunk re-requests, probation samples, telemetry (monotonic ``now``)."""
        if not self.online:
            return
        d = self._download
        if d is not None and not d.complete and now >= d.last_new_at + d.timeout:
            self._request_missing(d, "retry")
            d.last_new_at = now
            d.timeout = min(d.timeout * 2, self.settings.chunk_timeout_max_s)
        if self._probation_next is not None and now >= self._probation_next:
            self._probation_next = now + self.settings.probation_check_s
            self._sample_probation(now)
        if self.settings.telemetry_s > 0 and now >= self._telemetry_next:
            self._telemetry_next = now + self.settings.telemetry_s
            self._publish_telemetry(now)
        self._after_events()

    def seed(self, ref: ModelRef, artifact_id: str | None = None) -> None:
        """Start with ``ref`` committed, kept and serving (a device already in service; before it connects);
        ``artifact_id``: the artifact it was installed from (a deploy of the same one is "already serving")."""
        self._commits += 1
        self._kept[ref] = _Kept(ref, artifact_id, None, HealthSpec((), (), 0.0), RuntimeSpec("onnx", "onnxruntime"),
                                committed=True, committed_order=self._commits)
        self.machine = UpdateMachine(JournalRecord(committed=ref, committed_versions={ref.name: ref.version}))
        self.active = ref

    # -- what the status view reads -----------------------------------------------------------------------

    @property
    def lifecycle(self) -> str:
        return self.machine.state.value

    @property
    def committed(self) -> ModelRef | None:
        return self.machine.record.committed

    # -- feeding the machine ------------------------------------------------------------------------------

    def _after_events(self) -> None:
        self._take_deferred()
        if self._state_dirty:
            self._publish_state()

    def _feed(self, event: Event) -> None:
        feed(event, self)

    def _lifecycle_refused(self, event: Event, exc: LifecycleError) -> None:
        self._error_event(exc.code, exc.message)

    def _transitioned(self) -> None:
        if self.machine.state is not self._published_lifecycle:
            self._publish_state()

    # -- executors (agent.core.executor's table; memory for the store, a stand-in for inference) ---------------

    def _persist(self, record: JournalRecord) -> None:
        self._state_dirty = True  # the journal is this object; nothing to write

    def _serve_committed(self, ref: ModelRef | None, *, fallback: bool) -> Event | None:
        self.active = ref if ref in self._kept else None
        return None

    def _watch_probation(self) -> None:
        self._probation_next = self.monotonic()

    def _start_download(self, target: ModelRef, artifact_id: str, *, resume: bool = False) -> Event | None:
        try:
            d = self._open_download(target, artifact_id)
        except EdgeError as exc:
            return Failed(self.clock(), Failure("downloading", exc.code, exc.message))
        self._download = d
        if d.info.topic and self.client is not None:
            try:
                if parse_topic(d.info.topic).channel is Channel.ARTIFACT:
                    self.client.subscribe(d.info.topic, qos=1)
            except TopicError:
                log.warning("%s: ignoring artifact topic %r", self.device_id, d.info.topic)
        p = d.reassembly.progress()
        self._event(EventKind.DOWNLOAD_STARTED, model=target, deployment_id=d.desired.deployment_id,
                    data={"received": p.received, "total": p.total, "bytes": p.bytes_received,
                          "total_bytes": p.total_bytes, "resumed": False})
        self._request_missing(d, "initial")
        return None

    def _open_download(self, target: ModelRef, artifact_id: str) -> _Download:
        desired = self._desired.get(artifact_id)
        if desired is None:
            raise IntegrityError(f"no desired state describes artifact {artifact_id}")
        info, key = desired.artifact, desired.key
        if info is None or key is None or desired.model != target:
            raise IntegrityError(f"stored desired state does not describe artifact {artifact_id}")
        self.trusted.check_fresh(desired, self.clock())
        offer = self._delta_offer(desired, target)
        if offer is not None:  # the patch travels instead (applying it is a stand-in: no model bytes are kept here)
            info, key = offer.artifact, offer.key
        data_key = unwrap_key(key, self.key, artifact_id=info.artifact_id, device_id=self.device_id)
        sink = StreamingSink(total_size=info.compressed_size, compression=info.compression, model_size=info.size)
        reassembly = Reassembly.for_artifact(info, max_bytes=self.settings.max_artifact_bytes)
        mono = self.monotonic()
        return _Download(target, desired, info, ChunkOpener(data_key, info), reassembly, sink,
                         last_new_at=mono, timeout=self.settings.chunk_timeout_s, last_progress_at=mono,
                         artifact_id=artifact_id)

    def _delta_offer(self, desired: DesiredState, target: ModelRef) -> DeltaInfo | None:
        """The agent's rule (agent/runtime/delta.py): the base kept with the named digest, the patch small enough."""
        try:
            offer = delta_offer(desired)
        except EdgeError:
            return None
        if offer is None or desired.artifact is None:
            return None
        base = self._kept.get(ModelRef(target.name, offer.base_version))
        if base is None or base.sha256 != offer.base_sha256:
            return None
        return offer if offer.artifact.compressed_size <= 0.6 * desired.artifact.compressed_size else None

    def _request_missing(self, d: _Download, reason: str) -> None:
        ranges = d.reassembly.missing_ranges()
        if ranges:
            self.counters.retries += reason == "retry"
            req = ChunkRequest(device_id=self.device_id, artifact_id=d.info.artifact_id, ranges=ranges,
                               ts=self.clock(), reason=reason)
            self._publish(Channel.CHUNK_REQUEST, encode(req))

    def _on_chunk(self, payload: bytes) -> None:
        d = self._download
        if d is None or d.complete:
            return
        taken = take_chunk(payload, d.opener, d.reassembly, d.sink)
        self.counters.dropped_chunks += taken.outcome is Taken.DROPPED
        self.counters.duplicate_chunks += taken.outcome is Taken.DUPLICATE
        if taken.error is not None:
            self._error_event(taken.error.code, taken.note)
        if taken.outcome is not Taken.NEW:
            return
        self.counters.chunks += 1
        now = self.monotonic()
        d.last_new_at = now
        d.timeout = self.settings.chunk_timeout_s
        if d.reassembly.complete:
            self._feed(self._download_complete(d))
            return
        p = d.reassembly.progress()
        if progress_due(d.last_progress_fraction, p.fraction, now - d.last_progress_at,
                        self.settings.progress_interval_s):  # the agent's rule
            d.last_progress_fraction, d.last_progress_at = p.fraction, now
            self._event(EventKind.DOWNLOAD_PROGRESS, model=d.target, deployment_id=d.desired.deployment_id,
                        data={"received": p.received, "total": p.total, "bytes": p.bytes_received,
                              "total_bytes": p.total_bytes})

    def _download_complete(self, d: _Download) -> Event:
        d.complete = True
        if d.info.topic and self.client is not None:
            self.client.unsubscribe(d.info.topic)
        full = d.desired.artifact
        if full is not None and d.info.artifact_id != full.artifact_id:
            self._event(EventKind.DELTA_APPLIED, model=d.target, deployment_id=d.desired.deployment_id,
                        data={"delta_bytes": d.info.compressed_size, "full_bytes": full.compressed_size})
        p = d.reassembly.progress()
        self._event(EventKind.DOWNLOAD_COMPLETED, model=d.target, deployment_id=d.desired.deployment_id,
                    data={"received": p.received, "total": p.total, "bytes": p.bytes_received,
                          "total_bytes": p.total_bytes})
        return DownloadComplete(self.clock())

    def _discard_download(self, artifact_id: str) -> None:
        d = self._download
        if d is not None and d.artifact_id == artifact_id:
            if d.info.topic and self.client is not None and not d.complete:
                self.client.unsubscribe(d.info.topic)
            self._download = None
        self._desired.pop(artifact_id, None)

    def _verify(self, target: ModelRef, artifact_id: str) -> Event:
        d = self._download
        if d is None or d.artifact_id != artifact_id:
            return Failed(self.clock(), Failure("verifying", "integrity", "the download is gone"))
        try:
            d.reassembly.finish(d.sink)
            d.sink.check_model(d.info.sha256)
            runtime, health = d.desired.runtime, d.desired.health
            if runtime is None or health is None:
                raise IntegrityError("the desired state lacks a field a deploy needs")
        except EdgeError as exc:
            return Failed(self.clock(), Failure("verifying", exc.code, exc.message))
        sha = d.desired.artifact.sha256 if d.desired.artifact is not None else ""
        self._kept[target] = _Kept(target, artifact_id, d.desired.variant, health, runtime, sha256=sha)
        self._download = None
        self._desired.pop(artifact_id, None)
        return Verified(self.clock())

    def _load_candidate(self, target: ModelRef) -> Event:
        now = self.clock()
        kept = self._kept.get(target)
        if kept is None:
            return Failed.unkept(now, target)
        if target.version in self.settings.fail_versions:
            budget = kept.health.latency_budget_ms or 50.0
            check = HealthCheckError(f"p95 latency {budget * 4:.2f} ms over the {budget:.2f} ms budget (simulated)",
                                     check="latency")
            return Failed(now, Failure("warming", check.code, check.reason, check.check))
        self._candidate = target
        self._measured(stand_in(device_id=self.device_id, profile=self.settings.profile, model=target.name,
                                version=target.version, variant=kept.variant, base_ms=self.settings.latency_ms * 0.6,
                                ts=now, artifact_id=kept.artifact_id))
        policy = ProbationPolicy.from_health_spec(kept.health)
        baseline = self._stats(60.0) if self.active is not None else None
        return WarmedUp(now, policy, baseline)

    def _stats(self, elapsed_s: float) -> WindowStats:
        latency = self.settings.latency_ms
        return WindowStats(requests=int(elapsed_s * self.settings.requests_per_s), errors=0,
                           p50_ms=latency * 0.6, p95_ms=latency, p99_ms=latency * 1.4)

    def _switch_to(self, target: ModelRef) -> Event | None:
        if self._candidate != target:
            return Failed(self.clock(), Failure("probation", "model", "the candidate is not loaded", "load"))
        self._standby, self.active = self.active, target
        self._probation_since = self.monotonic()
        return None

    def _sample_probation(self, now: float) -> None:
        if self.machine.state is not State.PROBATION or self._probation_since is None:
            self._probation_next = None
            return
        self._feed(Sample(self.clock(), self._stats(now - self._probation_since)))

    def _commit(self, target: ModelRef) -> None:
        self._probation_next = None
        self._standby = self._candidate = None
        kept = self._kept.get(target)
        if kept is not None:
            kept.committed = True
            self._commits += 1
            kept.committed_order = self._commits
        same = sorted((k for k in self._kept.values() if k.ref.name == target.name and k.committed),
                      key=lambda k: k.committed_order, reverse=True)
        for old in same[self.settings.keep_versions:]:
            if old.ref != self.active:
                del self._kept[old.ref]

    def _restore(self, target: ModelRef | None, discard: ModelRef | None, artifact_id: str | None) -> Event:
        self._probation_next = None
        if artifact_id is not None:
            self._discard_download(artifact_id)
        record = self.machine.record
        want = target or record.committed
        if want is not None and want in self._kept:
            self.active = want
        elif self.active is not None and self.active == record.target:
            committed = record.committed
            self.active = committed if committed in self._kept else None
        served = self.active
        self._candidate = self._standby = None
        if discard is not None and discard != served:
            kept = self._kept.get(discard)
            if kept is not None and not kept.committed:
                del self._kept[discard]
        return RolledBack(self.clock(), served)

    # -- desired states and commands (agent.runtime.agent's rules) ------------------------------------------

    def _find(self, ref: ModelRef, *, committed_only: bool = False) -> _Kept | None:
        kept = self._kept.get(ref)
        return kept if kept is not None and (kept.committed or not committed_only) else None

    def committed_refs(self, name: str | None = None) -> list[ModelRef]:
        """Committed versions kept, most recently committed first (agent.core.intake.KeptVersions)."""
        kept = [k for k in self._kept.values() if k.committed and (name is None or k.ref.name == name)]
        return [k.ref for k in sorted(kept, key=lambda k: k.committed_order, reverse=True)]

    def committed_artifact(self, ref: ModelRef) -> str | None:
        kept = self._find(ref, committed_only=True)
        return kept.artifact_id if kept is not None else None

    def _kept_versions(self) -> SimDevice:
        return self

    def _save_desired(self, desired: DesiredState, blob: bytes) -> EdgeError | None:
        if desired.artifact is None:
            return IntegrityError("the desired state lacks a field a deploy needs")
        self._desired[desired.artifact.artifact_id] = desired
        return None

    def _accepted(self, desired: DesiredState, blob: bytes, message: str) -> None:
        self.trusted.accepted(desired)
        self._event(EventKind.DESIRED_ACCEPTED, model=desired.model, deployment_id=desired.deployment_id,
                    message=message, data={"action": desired.action, "seq": desired.seq})

    def _purge(self, cmd: Command, seen: Seen) -> None:
        self._feed(seen)
        record = self.machine.record
        keep = {r for r in (record.committed, record.target, self.active) if r is not None}
        removed = [k for k in list(self._kept) if k not in keep]
        for ref in removed:
            del self._kept[ref]
        self._state_dirty = True
        text = ", ".join(f"v{r.version}" for r in removed) or "nothing"
        self._command_result(cmd.command_id, "purge", ok=True, message=f"removed {text}")

    def _probe(self, cmd: Command, seen: Seen, request: ProbeRequest) -> None:
        """Stand-in figures for each variant asked about (no transfer, nothing run: a simulated board)."""
        self._feed(seen)
        self._command_result(cmd.command_id, "probe", ok=True, message=f"probing {len(request.variants)} variant(s)")
        for v in request.variants:
            self._measured(stand_in(device_id=self.device_id, profile=self.settings.profile, model=request.model.name,
                                    version=request.model.version, variant=v.variant,
                                    base_ms=self.settings.latency_ms * 0.6, ts=self.clock(), source="probe",
                                    artifact_id=v.artifact.artifact_id, probe_id=request.probe_id))
        self._event("probe.completed", model=request.model, message=f"probe {request.probe_id} (simulated)",
                    data={"probe_id": request.probe_id, "measured": [v.variant for v in request.variants],
                          "failed": {}})

    def _measured(self, measurement: Measurement) -> None:
        self.counters.measurements += 1
        self._publish(Channel.MEASUREMENT, encode(measurement))

    # -- publishing -----------------------------------------------------------------------------------------

    def _publish(self, channel: Channel, payload: bytes, *, retain: bool = False) -> None:
        if self.client is None or not self.online:
            return
        self.client.publish(device_topic(self.device_id, channel), payload, qos=1, retain=retain)
        self.counters.published += 1
        self.counters.published_bytes += len(payload)

    def _emit(self, event: WireEvent) -> None:
        kind = event.kind
        self.counters.events[kind] = self.counters.events.get(kind, 0) + 1
        if kind in MILESTONES:
            self.counters.milestones[kind] = self.clock()
        self._publish(Channel.EVENT, encode(event))

    def _serving(self) -> ModelRef | None:
        return self.active

    def _state_report(self, *, full: bool) -> StateReport:
        record = self.machine.record
        active: ActiveModel | None = None
        if self.active is not None:
            ref = self.active
            kept = self._kept.get(ref)
            on_probation = self.machine.state is State.PROBATION and ref == record.target
            active = ActiveModel(name=ref.name, version=ref.version,
                                 state="probation" if on_probation else "committed",
                                 artifact_id=kept.artifact_id if kept else None, variant=kept.variant if kept else None)
        name = record.committed.name if record.committed else (active.name if active else None)
        kept_versions = tuple(sorted({k.version for k in self._kept if k.name == name})) if name else ()
        report = StateReport(
            device_id=self.device_id, online=True, session=self.session, ts=self.clock(),
            lifecycle=record.state.value, active=active, target=record.target, kept=kept_versions,
            last_seq=record.last_seq, desired_expires_at=self.trusted.desired_expires_at,
        )
        if full:  # the birth report carries the static facts; later ones only what changes
            report = replace(report, profile=self.settings.profile, arch=SIM_ARCH,
                             agent_version=SIM_AGENT_VERSION, public_key=_b64(self.public_key))
        return report

    def _publish_state(self) -> None:
        self._state_dirty = False
        self._published_lifecycle = self.machine.state
        if not self.online:
            return
        report = self._state_report(full=not self._birth_sent)
        same = encode(replace(report, ts=0.0))
        if same == self._last_state:
            return  # nothing changed since the last report (the retained one still says it)
        self._publish(Channel.STATE, encode(report), retain=True)
        self._birth_sent, self._last_state = True, same

    def _publish_telemetry(self, now: float) -> None:
        window, self._telemetry_start = now - self._telemetry_start, now
        report = self._state_report(full=False)
        stats = self._stats(window) if self.active is not None else WindowStats()
        latency = {k: v for k, v in (("p50", stats.p50_ms), ("p95", stats.p95_ms), ("p99", stats.p99_ms))
                   if v is not None}
        telemetry = Telemetry(
            device_id=self.device_id, ts=self.clock(), window_s=round(window, 3), cpu_percent=10.0,
            memory_percent=20.0, rss_bytes=40 << 20, disk_free_bytes=8 << 30, requests=stats.requests,
            errors=stats.errors, latency_ms=latency, model=report.active, lifecycle=report.lifecycle, arch=SIM_ARCH,
        )
        self._publish(Channel.TELEMETRY, encode(telemetry))


def _b64(raw: bytes) -> str:
    import base64  # noqa: PLC0415

    return base64.b64encode(raw).decode()
