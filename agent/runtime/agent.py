"""The agent's driver: it executes what the lifecycle core decides, and feeds it what happened.

Theory of operation
    One thread (``Agent.run``) owns everything that changes state: the UpdateMachine, the store,
    the download in progress and every ModelHost management call. Other threads only put items
    on ``inbox``: paho's network thread (connects, messages, chunks) and the signal handler
    (stop). The HTTP server's threads call the ModelHost's ``infer`` directly; the host makes
    that safe against the swaps made here.

    A message becomes an event for the machine (signed desired state -> Deploy / Activate /
    SwitchBack; chunk data -> DownloadComplete once the artifact is whole; probation timer ->
    Sample). ``_feed`` hands the event to the machine and executes the effects it returns, in
    order, through the executor table ``_execute``; an executor that produces a result
    (verification, warm-up, restore) returns the next event, which is fed after the current
    effects have all run. After each fed event a StateReport goes out (retained), so the
    server sees every transition.

    Everything that can fail at the edges (bad signatures, replays, downgrades, expired
    manifests, tampered chunks, a full disk, a model that will not load or check) becomes either
    an ``error.*`` / ``desired.rejected`` event (nothing changes) or a ``Failed`` event for the
    machine (which rolls back). The serving model is only ever replaced by ``SwitchTo`` or
    ``Restore``; nothing else touches it.

    Time: the machine and the wire use wall-clock seconds (``clock``); timers use ``monotonic``;
    serving statistics use the host's own clock (``host.now()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import __version__
from agent.core.health import ProbationPolicy, StatsLike, WindowStats
from agent.core.journal import Failure as LifecycleFailure
from agent.core.journal import JournalRecord, State, Via, recover_replay_floor
from agent.core.lifecycle import (
    Activate,
    CommandResult,
    Commit,
    Continue,
    Deploy,
    DiscardDownload,
    DownloadComplete,
    Effect,
    Event,
    Failed,
    Fallback,
    LoadCandidate,
    Persist,
    Report,
    Restore,
    RolledBack,
    Sample,
    Seen,
    ServeCommitted,
    StartDownload,
    SwitchBack,
    SwitchTo,
    UpdateMachine,
    Verified,
    Verify,
    WarmedUp,
    WatchProbation,
)
from agent.core.reassembly import Added, Reassembly, progress_due
from agent.errors import (
    ArtifactTooLargeError,
    ConflictingChunkError,
    DowngradeError,
    EdgeError,
    ExpiredError,
    HealthCheckError,
    IntegrityError,
    LifecycleError,
    MemoryBudgetError,
    StorageError,
    TopicError,
    VersionNotKeptError,
    WrongRecipientError,
)
from agent.protocol.envelope import (
    ChunkOpener,
    TrustAnchor,
    open_command,
    open_desired,
    parse_chunk_header,
    unwrap_key,
    verify_payload,
)
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
    decode_payload,
    encode,
)
from agent.protocol.messages import Event as WireEvent
from agent.protocol.topics import Channel, device_down_filter, device_topic, parse_topic
from agent.runtime import faults
from agent.runtime.config import AgentConfig
from agent.runtime.keys import public_key_b64
from agent.runtime.mqtt import Connected, Disconnected, Message, MqttLink
from agent.runtime.store import KeptVersion, ModelStore, PartialDownload
from agent.runtime.telemetry import SystemSampler, machine_arch

log = logging.getLogger("agent")

#: A resume snapshot (fsync of the chunk data, then an atomic snapshot write) is taken once this many new
#: bytes or this many seconds have passed since the last one, whichever comes first: by bytes, not chunks,
#: so small chunks do not multiply fsyncs; by time, so a slow link still loses at most ~0.2 s of transfer on a crash.
SNAPSHOT_EVERY_BYTES = 8 << 20
SNAPSHOT_EVERY_S = 0.2
ERROR_EVENTS_PER_WINDOW = 5
ERROR_WINDOW_S = 10.0
MAX_IGNORED_BLOBS = 64


# -- the ModelHost as this module uses it (CONTRACTS.md section 6; agent.runtime.host implements it) ----------


class LoadedLike(Protocol):
    @property
    def ref(self) -> ModelRef: ...


class HostLike(Protocol):
    def load(self, path: Path, *, ref: ModelRef, runtime: RuntimeSpec, variant: str | None = None) -> Any: ...

    def check(self, model: Any, health: HealthSpec) -> Any: ...

    def activate(self, model: Any, *, keep_previous: bool = False) -> Any: ...

    def deactivate(self) -> Any: ...

    def unload(self, model: Any) -> None: ...

    @property
    def active(self) -> Any: ...

    def stats(self, *, since: float | None = None, version: int | None = None, name: str | None = None) -> Any: ...

    def now(self) -> float: ...


@dataclass
class _Download:
    """The transfer in progress (the durable part is the partial directory in the store)."""

    target: ModelRef
    desired: DesiredState
    info: ArtifactInfo
    opener: ChunkOpener
    reassembly: Reassembly
    partial: PartialDownload
    last_new_at: float
    timeout: float
    unsnapshotted: int = 0  # bytes stored since the last resume snapshot
    snapshot_job: Future[None] | None = None  # a snapshot being written in the background
    last_snapshot_at: float = 0.0
    last_progress_at: float = 0.0
    last_progress_fraction: float = 0.0
    complete: bool = False


def _write_snapshot(partial: PartialDownload, blob: bytes) -> None:
    try:
        partial.write_snapshot(blob)  # fsyncs the chunk data first
    except StorageError as exc:
        log.warning("cannot save the resume snapshot: %s", exc.message)
        return
    if faults.HOOK.armed is not None:
        faults.HOOK.reach("download:snapshot")


class _Stop:
    pass


STOP = _Stop()


class Agent:
    """One device agent; see the module docstring. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        host: HostLike,
        device_key: X25519PrivateKey,
        trust: TrustAnchor,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        http_url: str | None = None,
    ) -> None:
        self.config = config
        self.host = host
        #: where the local inference API listens (its bound port: ``[http] port = 0`` picks one), for status.json
        self.http_url = http_url
        self.device_key = device_key
        self.trust = trust
        self.clock = clock
        self.monotonic = monotonic
        self.device_id = config.device_id
        self.inbox: queue.Queue[Any] = queue.Queue()
        #: resume snapshots (fsync of the chunk data, then an atomic write) run here, off the agent's thread
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-snapshot")
        self.store = ModelStore(
            config.store_dir,
            keep=config.models.keep_versions,
            min_free_bytes=config.models.min_free_bytes,
            clock=clock,
        )
        self.machine = UpdateMachine()
        self.link: MqttLink | None = None
        self.sampler = SystemSampler(config.store_dir)
        self.public_key = public_key_b64(device_key.public_key())
        self.arch = machine_arch()
        self._download: _Download | None = None
        self._candidate: Any = None  # loaded, checked, not yet (or just) switched in
        self._standby: Any = None  # the previous model, kept loaded during probation for a fast switch back
        #: the standby is the previous *committed* version, kept after a commit (``[models] warm_standby``)
        self._standby_warm = False
        self._probation_since: float | None = None  # host clock
        self._probation_next: float | None = None  # monotonic
        self._pending_desired: bytes | None = None
        self._ignored_blobs: deque[str] = deque(maxlen=MAX_IGNORED_BLOBS)
        self._seq_floor = 0  # what seq.floor holds on disk
        self._desired_expires_at: float | None = None
        self._expiry_reported = False  # one desired.expired event per expired desired state (freeze detection)
        self._error_counts: dict[str, tuple[float, int]] = {}
        self._telemetry_next = 0.0
        self._telemetry_since: float | None = None
        self._telemetry_window_start = 0.0
        self._state_dirty = True
        self._published_lifecycle: State | None = None
        self._birth_sent = False  # the full report went out on the current connection
        self._last_state: bytes | None = None  # what the last report said (timestamp aside)
        self._head_done = False  # nothing is reported before the committed version serves
        self._started = threading.Event()
        self._stopping = False

    # -- public --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to return (any thread, signal handlers included)."""
        self.inbox.put(STOP)

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

    def run(self) -> None:
        self.startup()
        try:
            while True:
                item = self._next_item()
                if item is STOP:
                    break
                if item is not None:
                    self._dispatch(item)
                self._run_timers()
                self._after_events()
        finally:
            self.shutdown()

    # -- start and stop ----------------------------------------------------------------------------------

    def startup(self) -> None:
        record, problems = self.store.read_journal()
        for problem in problems:
            log.error("journal slot unreadable: %s", problem)
        if record is None:
            record = self._record_from_store()
        # Losing the journal must not lower the replay floor: take the highest seq any other record
        # vouches for (seq.floor, the last accepted desired state), and make seq.floor catch up.
        on_disk = self.store.read_seq_floor()
        self._seq_floor = on_disk or 0
        journal_seq = record.last_seq
        record = recover_replay_floor(record, on_disk, self._load_last_desired())
        if record.last_seq > journal_seq:
            log.warning("journal forgot the replay floor; restored", extra={"fields": {"last_seq": record.last_seq}})
        self._save_seq_floor(record.last_seq)
        removed = self.store.cleanup(record)
        if removed:
            log.info("removed leftovers of an interrupted run", extra={"fields": {"paths": removed}})
        boot = self.store.next_boot()
        self.link = MqttLink(
            self.config.broker,
            client_id=self.device_id,
            inbox=self.inbox,
            will=self._will,
            boot=boot,
        )
        self.link.subscribe(device_down_filter(self.device_id))
        self.machine, effects = UpdateMachine.recover(
            record, now=self.clock(), restart_limit=self.config.lifecycle.restart_limit
        )
        log.info(
            "starting",
            extra={
                "fields": {
                    "device_id": self.device_id,
                    "state": record.state.value,
                    "committed": _ref_text(record.committed),
                    "attempts": record.attempts,
                    "version": __version__,
                }
            },
        )
        if problems:
            how = "recovered from the other copy" if record.serial else "rebuilt from the store's current version"
            self._error_event("storage", f"journal damaged ({'; '.join(problems)}); {how}")
        # Serve the committed version first and get online; the rest of the resume step (continue a
        # download, verify again, roll back) runs once the device is reachable and says so.
        split = next(i for i, e in enumerate(effects) if isinstance(e, ServeCommitted)) + 1
        for answer in self._execute_all(effects[:split]):
            self._feed(answer)
        self._head_done = True
        self._after_events()
        self.link.start()
        for answer in self._execute_all(effects[split:]):
            self._feed(answer)
        self._after_events()
        self._telemetry_next = self.monotonic() + self.config.telemetry.interval_s
        self._telemetry_since = self.host.now()
        self._telemetry_window_start = self.monotonic()
        self._started.set()

    def _record_from_store(self) -> JournalRecord:
        """No readable journal: start from what the store says is current (a fresh device has nothing)."""
        current = self.store.current()
        if current is None:
            return JournalRecord()
        versions = {v.ref.name: v.ref.version for v in reversed(self.store.kept())}
        log.warning("no usable journal; serving the store's current version %s", _ref_text(current.ref))
        return JournalRecord(committed=current.ref, committed_versions=versions)

    def shutdown(self) -> None:
        self._stopping = True
        if self._download is not None:
            self._snapshot(self._download, force=True)
            self._settle_snapshot(self._download)
            self._download.partial.close()
        self._snapshots.shutdown(wait=True)
        if self.link is not None:
            topic = device_topic(self.device_id, Channel.STATE)
            self.link.stop(farewell=(topic, encode(self._state_report(online=False))))
        log.info("stopped")

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

    # -- the loop ----------------------------------------------------------------------------------------

    def _next_item(self) -> Any:
        timeout = max(0.0, self._next_deadline() - self.monotonic())
        try:
            return self.inbox.get(timeout=min(timeout, 1.0))
        except queue.Empty:
            return None

    def _next_deadline(self) -> float:
        deadlines = [self._telemetry_next]
        if self._probation_next is not None:
            deadlines.append(self._probation_next)
        d = self._download
        if d is not None and not d.complete:
            deadlines.append(d.last_new_at + d.timeout)
        return min(deadlines)

    def _dispatch(self, item: Any) -> None:
        try:
            if isinstance(item, Message):
                self._on_message(item)
            elif isinstance(item, Connected):
                self._on_connected(item)
            elif isinstance(item, Disconnected):
                log.warning("disconnected from the broker: %s", item.reason)
        except EdgeError as exc:  # a bug or an unexpected edge: report, keep serving
            log.exception("unhandled %s", exc.code)
            self._error_event(exc.code, exc.message)

    def _after_events(self) -> None:
        if self.machine.state is State.IDLE and self._pending_desired is not None:
            blob, self._pending_desired = self._pending_desired, None
            self._on_desired(blob)
        if self._state_dirty:
            self._state_dirty = False
            self._publish_state()

    def _run_timers(self) -> None:
        now = self.monotonic()
        d = self._download
        if d is not None and not d.complete and now >= d.last_new_at + d.timeout:
            self._request_missing(d, "retry")
            d.last_new_at = now
            d.timeout = min(d.timeout * 2, self.config.transfer.chunk_timeout_max_s)
        if self._probation_next is not None and now >= self._probation_next:
            self._probation_next = now + self.config.lifecycle.probation_check_s
            self._sample_probation()
        if now >= self._telemetry_next:
            self._telemetry_next = now + self.config.telemetry.interval_s
            self._publish_telemetry()
        self._check_desired_expiry()

    def _check_desired_expiry(self) -> None:
        """Freeze detection: no fresh signed desired state before the last one expired is reported, once."""
        expires = self._desired_expires_at
        if expires is None or self._expiry_reported or self.clock() <= expires:
            return
        self._expiry_reported = True
        self._state_dirty = True
        self._event(
            "desired.expired",
            severity="warning",
            code="expired",
            message=(
                f"the desired state expired at {expires:.0f} and no fresh one arrived: the server may be stuck "
                "or updates withheld (freeze); still serving the committed model"
            ),
            data={"expires_at": expires},
        )

    # -- feeding the machine ---------------------------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        pending: deque[Event] = deque([event])
        while pending:
            ev = pending.popleft()
            try:
                effects = self.machine.handle(ev)
            except LifecycleError as exc:
                log.warning("lifecycle refused %s in %s", type(ev).__name__, self.machine.state.value)
                self._error_event(exc.code, exc.message)
                continue
            pending.extend(self._execute_all(effects))
            if self._head_done and self.machine.state is not self._published_lifecycle:
                self._publish_state()  # one retained StateReport per transition, after its side effects

    def _execute_all(self, effects: list[Effect]) -> list[Event]:
        """Run effects in order; collect the events they answer with (fed after all of them ran)."""
        answers: list[Event] = []
        for effect in effects:
            answer = self._execute(effect)
            if answer is not None:
                answers.append(answer)
        return answers

    def _execute(self, effect: Effect) -> Event | None:
        """The executor table: one branch per effect type (lifecycle.py documents each)."""
        if isinstance(effect, Persist):
            self._persist(effect.record)
        elif isinstance(effect, Report):
            self._report(effect)
        elif isinstance(effect, CommandResult):
            self._command_result(effect.command_id, effect.action, ok=effect.ok, message=effect.message)
        elif isinstance(effect, ServeCommitted):
            return self._serve_committed(effect.ref, fallback=effect.fallback)
        elif isinstance(effect, StartDownload):
            return self._start_download(effect.target, effect.artifact_id, resume=effect.resume)
        elif isinstance(effect, DiscardDownload):
            self._discard_download(effect.artifact_id)
        elif isinstance(effect, Verify):
            return self._verify(effect.target, effect.artifact_id)
        elif isinstance(effect, LoadCandidate):
            return self._load_candidate(effect.target)
        elif isinstance(effect, SwitchTo):
            return self._switch_to(effect.target)
        elif isinstance(effect, WatchProbation):
            self._probation_next = self.monotonic()
        elif isinstance(effect, Commit):
            self._commit(effect.target)
        elif isinstance(effect, Restore):
            return self._restore(effect.target, effect.discard, effect.artifact_id)
        elif isinstance(effect, Continue):
            return effect.event
        return None

    # -- executors ---------------------------------------------------------------------------------------------

    def _persist(self, record: JournalRecord) -> None:
        self._save_seq_floor(record.last_seq)  # before the journal: the backup is never behind it
        try:
            self.store.write_journal(record)
            if faults.HOOK.armed is not None:
                faults.HOOK.reach(f"journal:{record.state.value}")
        except StorageError as exc:
            # Nothing sensible is left to do but say so: serving continues; the next transition retries.
            log.critical("cannot write the journal: %s", exc.message)
            self._error_event(exc.code, f"cannot write the journal: {exc.message}")
        self._state_dirty = True

    def _save_seq_floor(self, seq: int) -> None:
        # Only when the floor moves (a signed message accepted: rare), so chunks and other
        # transitions cost one integer comparison, not an fsync.
        if seq <= self._seq_floor:
            return
        try:
            self.store.write_seq_floor(seq)
        except StorageError as exc:
            log.warning("cannot write the replay floor: %s", exc.message)  # the journal still has it; retried later
            return
        self._seq_floor = seq

    def _report(self, report: Report) -> None:
        self._event(
            report.kind,
            severity=report.severity,
            message=report.message,
            code=report.code,
            model=report.model,
            deployment_id=report.deployment_id,
            data=report.data,
        )

    def _serve_committed(self, ref: ModelRef | None, *, fallback: bool) -> Event | None:
        candidates: list[ModelRef] = [] if ref is None or fallback else [ref]
        candidates += [v.ref for v in self.store.kept() if v.ref != ref and v.ref not in candidates]
        reasons: list[str] = [f"{_ref_text(ref)} keeps failing at start"] if fallback and ref else []
        served: ModelRef | None = None
        for candidate in candidates:
            try:
                self._load_and_activate(candidate)
            except EdgeError as exc:
                log.warning("cannot serve %s: %s", _ref_text(candidate), exc.message)
                reasons.append(f"{_ref_text(candidate)}: {exc.message}")
                continue
            served = candidate
            break
        if served is not None:
            self._fix_store_pointer(served)
        if ref is None or served == ref:
            return None
        return Fallback(self.clock(), failed=ref, serving=served, reason="; ".join(reasons))

    def _fix_store_pointer(self, ref: ModelRef) -> None:
        """The journal names the committed version; make the store agree (a crash can fall in between)."""
        current = self.store.current()
        if current is not None and current.ref == ref and current.committed:
            return
        try:
            self.store.commit(ref)
        except StorageError as exc:
            log.warning("cannot update the store pointer: %s", exc.message)

    def _load_and_activate(self, ref: ModelRef) -> None:
        """Load a kept version, check it works (not its speed: the board may be busy), switch to it."""
        kept = self.store.find(ref)
        if kept is None:
            raise VersionNotKeptError(ref.name, ref.version)
        self.store.verify_file(kept)
        model = self.host.load(kept.path, ref=kept.ref, runtime=kept.runtime, variant=kept.variant)
        try:
            self.host.check(model, replace(kept.health, latency_budget_ms=0.0, warmup_runs=1))
        except EdgeError:
            self.host.unload(model)
            raise
        self.host.activate(model)

    # downloads

    def _start_download(self, target: ModelRef, artifact_id: str, *, resume: bool) -> Event | None:
        try:
            download = self._open_download(target, artifact_id)
        except EdgeError as exc:
            return Failed(self.clock(), LifecycleFailure("downloading", exc.code, exc.message))
        self._download = download
        if download.info.topic:
            self._subscribe(download.info.topic)
        progress = download.reassembly.progress()
        self._event(
            "download.started",
            model=target,
            deployment_id=download.desired.deployment_id,
            data={
                "received": progress.received,
                "total": progress.total,
                "bytes": progress.bytes_received,
                "total_bytes": progress.total_bytes,
                "resumed": bool(resume and progress.received),
            },
        )
        if download.reassembly.complete:
            return self._download_complete(download)
        self._request_missing(download, "resume" if resume and progress.received else "initial")
        return None

    def _subscribe(self, topic: str) -> None:
        assert self.link is not None
        try:
            parsed = parse_topic(topic)
        except TopicError:
            log.warning("ignoring artifact topic %r outside the edgefleet tree", topic)
            return
        if parsed.channel is Channel.ARTIFACT:
            self.link.subscribe(topic)

    def _open_download(self, target: ModelRef, artifact_id: str) -> _Download:
        desired = self._reopen_desired(self.store.load_desired(artifact_id))
        info, key = desired.artifact, desired.key
        if info is None or key is None or info.artifact_id != artifact_id or desired.model != target:
            raise IntegrityError(f"stored desired state does not describe artifact {artifact_id}")
        limit = self.config.models.max_artifact_bytes
        if info.size > limit:
            raise ArtifactTooLargeError(info.size, limit)
        self._check_memory_budget(info.size, f"{_ref_text(target)} ({info.size}-byte model file)")
        data_key = unwrap_key(key, self.device_key, artifact_id=artifact_id, device_id=self.device_id)
        partial = self.store.partial(info)
        reassembly = Reassembly(
            artifact_id=artifact_id,
            chunk_count=info.chunk_count,
            chunk_size=info.chunk_size,
            total_size=info.compressed_size,
            sha256=info.compressed_sha256,
            max_bytes=limit,
        )
        snapshot = partial.read_snapshot()
        if snapshot is not None:
            try:
                reassembly.restore(snapshot)
            except StorageError as exc:
                log.warning("resume snapshot unusable (%s); starting the transfer over", exc.message)
        missing = info.compressed_size - reassembly.progress().bytes_received
        self.store.require_space(missing + info.size, f"downloading {_ref_text(target)}")
        partial.open()
        return _Download(
            target=target,
            desired=desired,
            info=info,
            opener=ChunkOpener(data_key, info),
            reassembly=reassembly,
            partial=partial,
            last_new_at=self.monotonic(),
            timeout=self.config.transfer.chunk_timeout_s,
            last_snapshot_at=self.monotonic(),
            last_progress_at=self.monotonic(),
        )

    def _reopen_desired(self, blob: bytes) -> DesiredState:
        """Check a stored desired state again (signature, recipient, expiry); its seq was accepted already."""
        desired = decode_payload(verify_payload(blob, "desired", self.trust), "desired")
        assert isinstance(desired, DesiredState)
        if desired.device_id != self.device_id:
            raise WrongRecipientError(self.device_id, desired.device_id)
        now = self.clock()
        if now > desired.expires_at + self.config.lifecycle.clock_skew_s:
            raise ExpiredError(desired.expires_at, now)
        return desired

    def _request_missing(self, download: _Download, reason: str) -> None:
        ranges = download.reassembly.missing_ranges()
        if not ranges:
            return
        request = ChunkRequest(
            device_id=self.device_id,
            artifact_id=download.info.artifact_id,
            ranges=ranges,
            ts=self.clock(),
            reason=reason,
        )
        self._publish(device_topic(self.device_id, Channel.CHUNK_REQUEST), encode(request))

    def _on_chunk(self, payload: bytes) -> None:
        d = self._download
        if d is None or d.complete:
            return
        try:
            header = parse_chunk_header(payload)
        except EdgeError as exc:
            self._error_event(exc.code, f"dropped a malformed chunk: {exc.message}")
            return
        if header.artifact_id != d.info.artifact_id:
            return  # another artifact's stream (an older rollout still running): not ours
        try:
            opened = d.opener.open_chunk(payload)
            added = d.reassembly.add(opened.index, opened.data, d.partial, fingerprint=opened.tag)
        except ConflictingChunkError as exc:
            self._error_event(exc.code, exc.message)
            return
        except StorageError as exc:
            self._feed(Failed(self.clock(), LifecycleFailure("downloading", exc.code, exc.message)))
            return
        except EdgeError as exc:  # failed authentication, wrong length: dropped, never stored
            self._error_event(exc.code, f"dropped chunk {header.index}: {exc.message}")
            return
        if added is Added.DUPLICATE:
            return
        if faults.HOOK.armed is not None:
            faults.HOOK.reach(f"download:chunk:{d.reassembly.progress().received}")
        now = self.monotonic()
        d.last_new_at = now
        d.timeout = self.config.transfer.chunk_timeout_s
        d.unsnapshotted += len(opened.data)
        if d.reassembly.complete:
            self._feed(self._download_complete(d))
            return
        self._snapshot(d)
        self._progress(d, now)

    def _snapshot(self, d: _Download, *, force: bool = False) -> None:
        """Persist the resume state when due (see SNAPSHOT_EVERY_*); ``force`` writes it now and waits.

        A due snapshot is written on a worker thread so chunk handling goes on during the fsyncs. It is
        still sound: the bitmap is taken here, after every chunk it names was written (pwrite, on this
        thread), and the worker fsyncs the data file before it writes the snapshot. One at a time: while
        one is in flight, a due snapshot waits for a later chunk.
        """
        now = self.monotonic()
        due = d.unsnapshotted >= SNAPSHOT_EVERY_BYTES or now - d.last_snapshot_at >= SNAPSHOT_EVERY_S
        if not d.unsnapshotted or not (force or due):
            return
        if not force and d.snapshot_job is not None and not d.snapshot_job.done():
            return
        self._settle_snapshot(d)
        blob = d.reassembly.to_bytes()
        d.unsnapshotted = 0
        d.last_snapshot_at = now
        if force:
            _write_snapshot(d.partial, blob)
        else:
            d.snapshot_job = self._snapshots.submit(_write_snapshot, d.partial, blob)

    @staticmethod
    def _settle_snapshot(d: _Download) -> None:
        """Wait for a background snapshot of ``d`` (before its partial is closed, discarded or verified)."""
        job, d.snapshot_job = d.snapshot_job, None
        if job is not None:
            job.result()

    def _progress(self, d: _Download, now: float) -> None:
        """``download.progress`` per quarter, at most every ``progress_interval_s`` (``progress_due``): per-10%
        events cost a fleet of a thousand ~3 KB per device and rollout (docs/benchmarks.md, bench_fleet)."""
        p = d.reassembly.progress()
        if not progress_due(d.last_progress_fraction, p.fraction, now - d.last_progress_at,
                            self.config.transfer.progress_interval_s):
            return
        d.last_progress_fraction, d.last_progress_at = p.fraction, now
        self._event(
            "download.progress",
            model=d.target,
            deployment_id=d.desired.deployment_id,
            data={"received": p.received, "total": p.total, "bytes": p.bytes_received, "total_bytes": p.total_bytes},
        )

    def _download_complete(self, d: _Download) -> Event:
        self._snapshot(d, force=True)
        d.complete = True
        if d.info.topic and self.link is not None:
            self.link.unsubscribe(d.info.topic)
        p = d.reassembly.progress()
        self._event(
            "download.completed",
            model=d.target,
            deployment_id=d.desired.deployment_id,
            data={"received": p.received, "total": p.total, "bytes": p.bytes_received, "total_bytes": p.total_bytes},
        )
        return DownloadComplete(self.clock())

    def _discard_download(self, artifact_id: str) -> None:
        d = self._download
        if d is not None and d.info.artifact_id == artifact_id:
            self._settle_snapshot(d)
            d.partial.close()
            if d.info.topic and self.link is not None:
                self.link.unsubscribe(d.info.topic)
            self._download = None
        try:
            self.store.discard_partial(artifact_id)
        except StorageError as exc:
            log.warning("cannot remove partial download %s: %s", artifact_id, exc.message)

    def _verify(self, target: ModelRef, artifact_id: str) -> Event:
        d = self._download
        try:
            if d is None or d.info.artifact_id != artifact_id:  # after a restart in verifying
                d = self._open_download(target, artifact_id)
            self._settle_snapshot(d)
            d.reassembly.finish(d.partial)
            self.store.install(
                ref=target,
                info=d.info,
                runtime=_need(d.desired.runtime),
                health=_need(d.desired.health),
                variant=d.desired.variant,
                source=d.partial.data_path,
            )
        except EdgeError as exc:
            return Failed(self.clock(), LifecycleFailure("verifying", exc.code, exc.message))
        finally:
            if d is not None:
                d.partial.close()
        self._download = None
        self._discard_download(artifact_id)
        return Verified(self.clock())

    # warm-up, switch, probation

    def _load_candidate(self, target: ModelRef) -> Event:
        now = self.clock()
        kept = self.store.find(target)
        if kept is None:
            err = VersionNotKeptError(target.name, target.version)
            return Failed(now, LifecycleFailure("warming", err.code, err.message, "load"))
        self._make_room(kept.size, f"{_ref_text(target)} ({kept.size}-byte model file)")
        try:
            self.store.verify_file(kept)
            rss_before = _rss_bytes()
            _reset_peak_rss()
            model = self.host.load(kept.path, ref=kept.ref, runtime=kept.runtime, variant=kept.variant)
        except EdgeError as exc:
            return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "load"))
        rss_after = _rss_bytes()
        if rss_before is not None and rss_after is not None:
            try:
                self._check_memory_budget(
                    max(rss_after - rss_before, kept.size), f"{_ref_text(target)} once loaded"
                )
            except MemoryBudgetError as exc:
                self.host.unload(model)
                return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "memory"))
        health = self._scaled(kept.health)
        try:
            report = self.host.check(model, health)
        except HealthCheckError as exc:
            self.host.unload(model)
            return Failed(now, LifecycleFailure("warming", exc.code, exc.reason, exc.check))
        except EdgeError as exc:
            self.host.unload(model)
            return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "load"))
        rss_warm = _peak_rss_bytes()  # the high-water mark: a big tensor freed after the run still counts
        if rss_before is not None and rss_warm is not None:
            try:  # warm-up ran the model: what its intermediate tensors and arenas took counts too
                self._check_memory_budget(rss_warm - rss_before, f"{_ref_text(target)} once warmed up")
            except MemoryBudgetError as exc:
                self.host.unload(model)
                return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "memory"))
        log.info("health check passed", extra={"fields": {"model": _ref_text(target), "report": repr(report)}})
        self._candidate = model
        policy = ProbationPolicy.from_health_spec(health)
        return WarmedUp(self.clock(), policy, self._baseline(policy))

    def _check_memory_budget(self, candidate_bytes: int, what: str) -> None:
        """Refuse a candidate that, beside the committed model (kept loaded through probation), busts the budget.

        A warm standby counts too; when releasing it is what makes the candidate fit, it is released.
        """
        budget = self.config.models.memory_budget_bytes
        if not budget:
            return
        self._make_room(candidate_bytes, what)
        committed = self._committed_install()
        resident = (committed.size if committed is not None else 0) + self._warm_standby_bytes()
        if candidate_bytes + resident > budget:
            raise MemoryBudgetError(candidate_bytes + resident, budget, f"{what} beside the committed model")

    def _warm_standby_bytes(self) -> int:
        """What the warm standby counts against the memory budget: its model file's size (0 when none)."""
        if self._standby is None or not self._standby_warm:
            return 0
        kept = self.store.find(self._standby.ref)
        return kept.size if kept is not None else 0

    def _make_room(self, candidate_bytes: int, what: str) -> None:
        """Release the warm standby when the candidate fits the memory budget without it and not with it."""
        budget = self.config.models.memory_budget_bytes
        standby_bytes = self._warm_standby_bytes()
        if not budget or not standby_bytes:
            return
        committed = self._committed_install()
        resident = committed.size if committed is not None else 0
        if candidate_bytes + resident + standby_bytes > budget >= candidate_bytes + resident:
            log.info(
                "releasing the warm standby to make room",
                extra={
                    "fields": {
                        "standby": _ref_text(self._standby.ref),
                        "candidate": what,
                        "budget": budget,
                        "standby_bytes": standby_bytes,
                    }
                },
            )
            self._release_standby()

    def _standby_fits(self, committed: ModelRef, standby: ModelRef) -> bool:
        """Whether ``standby`` may stay loaded beside ``committed``: kept on disk and within the memory budget."""
        kept_standby = self.store.find(standby)
        if kept_standby is None:
            return False
        budget = self.config.models.memory_budget_bytes
        if not budget:
            return True
        kept_committed = self.store.find(committed)
        return kept_standby.size + (kept_committed.size if kept_committed is not None else 0) <= budget

    def _scaled(self, health: HealthSpec) -> HealthSpec:
        """The server's health spec with its latency budget times ``lifecycle.latency_scale`` (1 leaves it as is)."""
        scale = self.config.lifecycle.latency_scale
        if scale == 1.0 or health.latency_budget_ms <= 0:
            return health
        return replace(health, latency_budget_ms=health.latency_budget_ms * scale)

    def _baseline(self, policy: ProbationPolicy) -> StatsLike | None:
        active = self.host.active
        if active is None:
            return None
        window = max(policy.window_s, 30.0)
        stats = self.host.stats(since=self.host.now() - window, version=active.ref.version, name=active.ref.name)
        return _window(stats)

    def _switch_to(self, target: ModelRef) -> Event | None:
        if self._candidate is None or self._candidate.ref != target:
            return Failed(self.clock(), LifecycleFailure("probation", "model", "the candidate is not loaded", "load"))
        if self._standby is not None:  # a warm standby of an older version: the one now serving takes its place
            log.info("releasing the warm standby", extra={"fields": {"standby": _ref_text(_ref(self._standby))}})
            self._release_standby()
        previous = self.host.activate(self._candidate, keep_previous=True)
        self._standby = previous
        self._probation_since = self.host.now()
        log.info("switched", extra={"fields": {"model": _ref_text(target), "previous": _ref_text(_ref(previous))}})
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("switched")
        return None

    def _sample_probation(self) -> None:
        target = self.machine.record.target
        if self.machine.state is not State.PROBATION or target is None or self._probation_since is None:
            self._probation_next = None
            return
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("probation:sample")
        stats = self.host.stats(since=self._probation_since, version=target.version, name=target.name)
        self._feed(Sample(self.clock(), _window(stats)))

    def _commit(self, target: ModelRef) -> None:
        self._probation_next = None
        self._candidate = None
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("commit")
        try:
            self.store.commit(target)
        except StorageError as exc:
            log.warning("cannot mark %s committed in the store: %s", _ref_text(target), exc.message)
            self._error_event(exc.code, exc.message)
        standby = self._standby
        if standby is None or _ref(self.host.active) != target:
            return
        if self.config.models.warm_standby and self._standby_fits(target, standby.ref):
            self._standby_warm = True  # memory only: after a restart the committed version serves alone
            log.info("keeping the previous version loaded as a warm standby", extra={
                "fields": {"model": _ref_text(target), "standby": _ref_text(standby.ref)}
            })
        else:
            self._release_standby()

    def _release_standby(self) -> None:
        standby, self._standby = self._standby, None
        self._standby_warm = False
        if standby is not None and standby is not self.host.active:
            try:
                self.host.unload(standby)
            except EdgeError as exc:
                log.warning("cannot release the previous model: %s", exc.message)

    def _restore(self, target: ModelRef | None, discard: ModelRef | None, artifact_id: str | None) -> Event:
        self._probation_next = None
        if artifact_id is not None:
            self._discard_download(artifact_id)
        want = target or self.machine.record.committed
        served = self._ensure_serving(want)
        candidate, self._candidate = self._candidate, None
        if candidate is not None and candidate is not self.host.active:
            try:
                self.host.unload(candidate)
            except EdgeError as exc:
                log.warning("cannot unload the candidate: %s", exc.message)
        if not (self._standby_warm and served is not None and served == self.machine.record.committed):
            self._release_standby()  # a warm standby stays when the committed version serves on (a failed update)
        if discard is not None and discard != served:
            try:
                self.store.discard_staged(discard)
            except StorageError as exc:
                log.warning("cannot remove %s: %s", _ref_text(discard), exc.message)
        return RolledBack(self.clock(), served)

    def _ensure_serving(self, want: ModelRef | None) -> ModelRef | None:
        """Make ``want`` serve (standby first, then the store); else the committed one, else any kept one."""
        active = _ref(self.host.active)
        if want is None:
            if active is not None and active == self.machine.record.target:
                self.host.deactivate()  # a first-ever deploy failed after its switch: nothing else to serve
                return None
            return active
        if active == want:
            return want
        standby = self._standby
        if standby is not None and standby.ref == want and self._standby_healthy(standby):
            self.host.activate(standby)
            self._standby, self._standby_warm = None, False
            log.info("switched to the standby without loading", extra={"fields": {"model": _ref_text(want)}})
            return want
        committed = self.machine.record.committed
        options = [want] + [r for r in (committed,) if r is not None and r != want]
        options += [v.ref for v in self.store.kept() if v.ref not in options]
        for ref in options:
            if ref == active and ref != self.machine.record.target:
                return ref
            try:
                self._load_and_activate(ref)
            except EdgeError as exc:
                log.warning("cannot serve %s: %s", _ref_text(ref), exc.message)
                continue
            return ref
        return _ref(self.host.active)

    def _drop_unkept_standby(self) -> None:
        """A warm standby whose version left the store (purge, kept-version eviction) is released."""
        standby = self._standby
        if standby is not None and self._standby_warm and self.store.find(standby.ref) is None:
            log.info("releasing the warm standby: its version is no longer kept", extra={
                "fields": {"standby": _ref_text(standby.ref)}
            })
            self._release_standby()

    def _standby_healthy(self, standby: Any) -> bool:
        """A warm standby sat idle since its commit: check it still works before it serves (as a load from disk is).

        During probation the standby is the committed version that served a moment ago: no check.
        """
        if not self._standby_warm:
            return True
        kept = self.store.find(standby.ref)
        try:
            if kept is None:
                raise VersionNotKeptError(standby.ref.name, standby.ref.version)
            self.host.check(standby, replace(kept.health, latency_budget_ms=0.0, warmup_runs=1))
        except EdgeError as exc:
            log.warning("the warm standby fails its check: %s", exc.message, extra={
                "fields": {"model": _ref_text(standby.ref)}
            })
            self._release_standby()
            return False
        return True

    # -- messages -----------------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            return
        if parsed.channel in (Channel.CHUNK, Channel.ARTIFACT):
            self._on_chunk(msg.payload)
        elif parsed.device_id != self.device_id:
            return
        elif parsed.channel is Channel.DESIRED:
            if msg.payload:
                self._on_desired(msg.payload)
        elif parsed.channel is Channel.COMMAND:
            self._on_command(msg.payload)

    def _on_connected(self, connected: Connected) -> None:
        log.info("connected", extra={"fields": {"session": connected.session, "resumed": connected.session_present}})
        self._state_dirty = True
        self._birth_sent, self._last_state = False, None  # a new connection: its birth report goes out in full
        record = self.machine.record
        if record.last_seq == 0:
            enroll = EnrollRequest(
                device_id=self.device_id,
                public_key=self.device_key.public_key().public_bytes_raw(),
                profile=self.config.profile,
                ts=self.clock(),
                agent_version=__version__,
                arch=self.arch,
            )
            self._publish(device_topic(self.device_id, Channel.ENROLL), encode(enroll))
        d = self._download
        if d is not None and not d.complete:
            self._request_missing(d, "resume")  # the server may have restarted and forgotten the request

    def _on_desired(self, blob: bytes) -> None:
        digest = hashlib.sha256(blob).hexdigest()
        record = self.machine.record
        if digest == record.last_desired_sha256 or digest in self._ignored_blobs:
            return  # the retained desired state, re-delivered on reconnect
        now = self.clock()
        try:
            desired = open_desired(
                blob,
                trust=self.trust,
                device_id=self.device_id,
                now=now,
                last_seq=record.last_seq,
                committed_version=lambda _name: None,  # checked below, once we know the message is authentic
                skew=self.config.lifecycle.clock_skew_s,
            )
        except EdgeError as exc:
            self._ignored_blobs.append(digest)
            self._event("desired.rejected", severity="warning", code=exc.code, message=exc.message)
            return
        model = desired.model
        if desired.action == "deploy":
            floor = record.committed_version(model.name)
            if floor is not None and model.version < floor:
                self._feed(Seen(now, desired.seq, digest))
                err = DowngradeError(model.name, model.version, floor)
                self._event("desired.rejected", severity="warning", code=err.code, message=err.message, model=model)
                return
            self._on_deploy(desired, blob, digest)
        else:
            self._on_pin(desired, blob, digest)

    def _accepted(self, desired: DesiredState, blob: bytes, message: str) -> None:
        self._desired_expires_at = desired.expires_at
        self._expiry_reported = False
        try:
            self.store.save_last_desired(blob)
        except StorageError as exc:
            log.warning("cannot keep the desired state: %s", exc.message)
        self._event(
            "desired.accepted",
            model=desired.model,
            deployment_id=desired.deployment_id,
            message=message,
            data={"action": desired.action, "seq": desired.seq},
        )

    def _on_deploy(self, desired: DesiredState, blob: bytes, digest: str) -> None:
        info = _need(desired.artifact)
        record, state, now = self.machine.record, self.machine.state, self.clock()
        committed = self._committed_install()
        same_as_committed = record.committed == desired.model and committed is not None
        if same_as_committed and committed is not None and committed.artifact_id == info.artifact_id:
            self._feed(Seen(now, desired.seq, digest))
            self._accepted(desired, blob, "already serving this version")
            return
        if state is State.DOWNLOADING and record.artifact_id == info.artifact_id:
            self._feed(Seen(now, desired.seq, digest))  # the same rollout, re-signed: keep downloading
            self._accepted(desired, blob, "already downloading this artifact")
            return
        if state not in (State.IDLE, State.DOWNLOADING):
            self._pending_desired = blob  # not acknowledged: a crash before it runs re-delivers it
            log.info("deploy deferred until %s ends", state.value)
            return
        try:
            self.store.save_desired(info.artifact_id, blob)
        except StorageError as exc:
            self._feed(Seen(now, desired.seq, digest))
            self._event("desired.rejected", severity="error", code=exc.code, message=exc.message, model=desired.model)
            return
        self._accepted(desired, blob, "deploying")
        self._feed(
            Deploy(desired.model, info.artifact_id, now, desired.deployment_id, seq=desired.seq, desired_sha256=digest)
        )

    def _on_pin(self, desired: DesiredState, blob: bytes, digest: str) -> None:
        target, record, state, now = desired.model, self.machine.record, self.machine.state, self.clock()
        if record.committed == target and state is State.IDLE:
            self._feed(Seen(now, desired.seq, digest))
            self._accepted(desired, blob, "already serving this version")
            return
        if self.store.find(target, committed_only=True) is None:
            self._feed(Seen(now, desired.seq, digest))
            err = VersionNotKeptError(target.name, target.version)
            self._event("desired.rejected", severity="warning", code=err.code, message=err.message, model=target)
            self._error_event(err.code, err.message)
            return
        backwards = record.committed is not None and (
            target.name != record.committed.name or target.version <= record.committed.version
        )
        if (state is State.PROBATION and backwards) or state in (State.IDLE, State.DOWNLOADING):
            self._accepted(desired, blob, "switching to a kept version")
            kind = SwitchBack if backwards else Activate
            self._feed(
                kind(
                    target,
                    now,
                    via=Via.PIN,
                    deployment_id=desired.deployment_id,
                    seq=desired.seq,
                    desired_sha256=digest,
                )
            )
        else:
            self._pending_desired = blob

    def _on_command(self, blob: bytes) -> None:
        record, now = self.machine.record, self.clock()
        try:
            cmd = open_command(
                blob,
                trust=self.trust,
                device_id=self.device_id,
                now=now,
                last_seq=record.last_seq,
                skew=self.config.lifecycle.clock_skew_s,
            )
        except EdgeError as exc:
            self._error_event(exc.code, f"command rejected: {exc.message}")
            return
        log.info("command", extra={"fields": {"action": cmd.action, "command_id": cmd.command_id, "seq": cmd.seq}})
        if cmd.action == "ping":
            self._feed(Seen(now, cmd.seq))
            self._command_result(cmd.command_id, "ping", ok=True, message="pong")
        elif cmd.action == "purge":
            self._purge(cmd)
        elif cmd.action in ("rollback", "activate"):
            self._switch_command(cmd)

    def _purge(self, cmd: Command) -> None:
        self._feed(Seen(self.clock(), cmd.seq))
        record = self.machine.record
        keep: set[ModelRef] = {r for r in (record.committed, record.target, _ref(self.host.active)) if r is not None}
        try:
            removed = self.store.purge(keep=keep)
        except StorageError as exc:
            self._command_result(cmd.command_id, "purge", ok=False, message=exc.message)
            return
        self._state_dirty = True
        self._drop_unkept_standby()
        text = ", ".join(f"v{v.ref.version}" for v in removed) or "nothing"
        self._command_result(cmd.command_id, "purge", ok=True, message=f"removed {text}")

    def _switch_command(self, cmd: Command) -> None:
        record, state, now = self.machine.record, self.machine.state, self.clock()
        name = cmd.model or (record.committed.name if record.committed else None)
        target: ModelRef | None = None
        if name is not None and cmd.version is not None:
            target = ModelRef(name, cmd.version)
        elif name is not None and cmd.action == "rollback":
            if state in (State.PROBATION, State.DOWNLOADING) and record.committed is not None:
                target = record.committed  # roll back the update in progress
            else:
                older = [v.ref for v in self.store.kept(name) if v.ref != record.committed]
                target = older[0] if older else None
        if target is None or self.store.find(target, committed_only=True) is None:
            self._feed(Seen(now, cmd.seq))
            err = VersionNotKeptError(name or "model", None if target is None else target.version)
            self._command_result(cmd.command_id, cmd.action, ok=False, message=err.message)
            self._error_event(err.code, err.message)
            return
        if target == record.committed and state is State.IDLE:
            self._feed(Seen(now, cmd.seq))
            self._command_result(
                cmd.command_id, cmd.action, ok=True, message=f"already serving version {target.version}"
            )
            return
        if cmd.action == "rollback" and state in (State.IDLE, State.DOWNLOADING, State.PROBATION):
            self._feed(SwitchBack(target, now, via=Via.ROLLBACK, command_id=cmd.command_id, seq=cmd.seq))
        elif cmd.action == "activate" and state in (State.IDLE, State.DOWNLOADING):
            self._feed(Activate(target, now, via=Via.ACTIVATE, command_id=cmd.command_id, seq=cmd.seq))
        else:
            self._feed(Seen(now, cmd.seq))
            self._command_result(
                cmd.command_id, cmd.action, ok=False, message=f"busy ({state.value}); send it again when idle"
            )

    # -- publishing ---------------------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.link is None:
            return
        try:
            self.link.publish(topic, payload, retain=retain)
        except EdgeError as exc:
            log.warning("publish failed: %s", exc.message)

    def _event(
        self,
        kind: str,
        *,
        severity: str = "info",
        message: str = "",
        code: str | None = None,
        model: ModelRef | None = None,
        deployment_id: str | None = None,
        command_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        event = WireEvent(
            device_id=self.device_id,
            ts=self.clock(),
            event_id=uuid.uuid4().hex,
            kind=kind,
            severity=severity,
            message=message,
            code=code,
            deployment_id=deployment_id,
            model=model,
            command_id=command_id,
            data=dict(data or {}),
        )
        level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        fields: dict[str, Any] = {"kind": kind, "model": _ref_text(model)}
        fields.update({k: v for k, v in (("code", code), ("deployment_id", deployment_id)) if v})
        if data:
            fields["data"] = dict(data)
        log.log(level, message or kind, extra={"fields": fields})
        self._publish(device_topic(self.device_id, Channel.EVENT), encode(event))

    def _error_event(self, code: str, message: str) -> None:
        """``error.<code>``, at most ERROR_EVENTS_PER_WINDOW per code every ERROR_WINDOW_S (a flood stays local)."""
        now = self.monotonic()
        start, count = self._error_counts.get(code, (now, 0))
        if now - start > ERROR_WINDOW_S:
            start, count = now, 0
        self._error_counts[code] = (start, count + 1)
        if count >= ERROR_EVENTS_PER_WINDOW:
            log.debug("error event suppressed", extra={"fields": {"code": code}})
            return
        self._event(f"error.{code}", severity="warning", code=code, message=message)

    def _command_result(self, command_id: str, action: str, *, ok: bool, message: str) -> None:
        active = _ref(self.host.active)
        self._event(
            "command.result",
            severity="info" if ok else "warning",
            message=message,
            command_id=command_id,
            model=active,
            data={"ok": ok, "action": action, "active": active.to_dict() if active else None, "message": message},
        )

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
            desired_expires_at=self._desired_expires_at,
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

    def _load_last_desired(self) -> int | None:
        """Note the expiry of the last accepted desired state; returns its seq (a floor for replays)."""
        blob = self.store.load_last_desired()
        if blob is None:
            return None
        try:
            desired = decode_payload(verify_payload(blob, "desired", self.trust), "desired")
        except EdgeError:
            return None
        assert isinstance(desired, DesiredState)
        self._desired_expires_at = desired.expires_at
        return desired.seq


# -- small helpers ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_bytes().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> None:
    """Reset this process's resident high-water mark (Linux >= 4.0; a no-op where not allowed)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_bytes(b"5")


def _peak_rss_bytes() -> int | None:
    """The resident high-water mark since the last reset (VmHWM), or the current RSS where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _rss_bytes()


def _ref(model: Any) -> ModelRef | None:
    return model.ref if model is not None else None


def _ref_text(ref: ModelRef | None) -> str | None:
    return f"{ref.name} v{ref.version}" if ref is not None else None


def _ref_dict(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref is not None else None


def _need(value: Any) -> Any:
    if value is None:
        raise IntegrityError("the desired state lacks a field a deploy needs")
    return value


def _window(stats: Any) -> WindowStats:
    return WindowStats(
        requests=int(getattr(stats, "requests", 0)),
        errors=int(getattr(stats, "errors", 0)),
        p50_ms=getattr(stats, "p50_ms", None),
        p95_ms=getattr(stats, "p95_ms", None),
        p99_ms=getattr(stats, "p99_ms", None),
    )


__all__ = ["STOP", "Agent", "HostLike"]
