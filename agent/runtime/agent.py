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

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import __version__
from agent.core.device import DeviceCore
from agent.core.executor import execute_all, feed
from agent.core.journal import JournalRecord
from agent.core.lifecycle import (
    Effect,
    Event,
    Seen,
    ServeCommitted,
    UpdateMachine,
)
from agent.errors import EdgeError, LifecycleError, StorageError, TopicError
from agent.protocol.envelope import TrustAnchor
from agent.protocol.events import EventKind
from agent.protocol.messages import Command, DesiredState, EnrollRequest, ModelRef, encode
from agent.protocol.topics import Channel, device_down_filter, device_topic, parse_topic
from agent.runtime import faults
from agent.runtime.config import AgentConfig
from agent.runtime.download import Downloads
from agent.runtime.download_state import Download
from agent.runtime.heap import settle_heap
from agent.runtime.keys import public_key_b64
from agent.runtime.mqtt import Connected, Disconnected, Message, MqttLink
from agent.runtime.parts import HostLike, _need, _ref, _ref_text
from agent.runtime.probing import Probing
from agent.runtime.store import ModelStore
from agent.runtime.swap import Swapping
from agent.runtime.telemetry import SystemSampler, machine_arch

log = logging.getLogger("agent")


class _Stop:
    pass


STOP = _Stop()
#: at most this many queued items are dispatched back to back before the timers and state report run again
DRAIN_MAX = 64


class Agent(Downloads, Swapping, Probing):
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
        DeviceCore.__init__(self, config.device_id, trust, skew=config.lifecycle.clock_skew_s, clock=clock,
                            monotonic=monotonic)
        self.device_key = device_key
        self.trust = trust
        self.inbox: queue.Queue[Any] = queue.Queue()
        #: resume snapshots (fsync of the chunk data, then an atomic write) run here, off the agent's thread
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-snapshot")
        self.store = ModelStore(
            config.store_dir,
            keep=config.models.keep_versions,
            min_free_bytes=config.models.min_free_bytes,
            clock=clock,
        )
        self.link: MqttLink | None = None
        self.sampler = SystemSampler(config.store_dir)
        self.public_key = public_key_b64(device_key.public_key())
        self.arch = machine_arch()
        self._download: Download | None = None
        self._candidate: Any = None  # loaded, checked, not yet (or just) switched in
        self._standby: Any = None  # the previous model, kept loaded during probation for a fast switch back
        #: the standby is the previous *committed* version, kept after a commit (``[models] warm_standby``)
        self._standby_warm = False
        self._measured = {}
        self._probe_job = None
        self._telemetry_since: float | None = None
        self._telemetry_window_start = 0.0
        self._state_dirty = True
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
                if item is STOP or (item is not None and self._dispatch_queued(item)):
                    break
                self._run_timers()
                self._after_events()
        finally:
            self.shutdown()

    def _dispatch_queued(self, item: Any) -> bool:
        """Dispatch ``item`` and up to ``DRAIN_MAX - 1`` items already queued behind it (a chunk stream), so the
        timers and the state report run once per batch rather than once per chunk; a desired state deferred
        while busy is still taken between items, as before. True when STOP was among them."""
        self._dispatch(item)
        for _ in range(DRAIN_MAX - 1):
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return False
            if item is STOP:
                return True
            self._take_deferred()
            self._dispatch(item)
        return False

    # -- start and stop ----------------------------------------------------------------------------------

    def startup(self) -> None:
        record, problems = self.store.read_journal()
        for problem in problems:
            log.error("journal slot unreadable: %s", problem)
        if record is None:
            record = self._record_from_store()
        # Losing the journal must not lower the replay floor: take the highest seq any other record
        # vouches for (seq.floor, the last accepted desired state), and make seq.floor catch up.
        journal_seq = record.last_seq
        record = self.trusted.recover(
            record, on_disk=self.store.read_seq_floor(), last_desired=self.store.load_last_desired()
        )
        if record.last_seq > journal_seq:
            log.warning("journal forgot the replay floor; restored", extra={"fields": {"last_seq": record.last_seq}})
        self._save_seq_floor(record.last_seq)
        removed = self.store.cleanup(record)
        self._forget_probe_files()  # a probe does not survive a restart; the server's timeout names this device
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
        settle_heap()  # the startup heap out of the collector's full passes (agent/runtime/heap.py)
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
        self._take_deferred()
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
        self._probe_timers(now)
        if now >= self._telemetry_next:
            self._telemetry_next = now + self.config.telemetry.interval_s
            self._publish_telemetry()
        self._check_desired_expiry()

    def _check_desired_expiry(self) -> None:
        """Freeze detection: no fresh signed desired state before the last one expired is reported, once."""
        expires = self.trusted.expiry_due(self.clock())
        if expires is None:
            return
        self._state_dirty = True
        self._event(
            EventKind.DESIRED_EXPIRED,
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
        feed(event, self)

    def _execute_all(self, effects: list[Effect]) -> list[Event]:
        return execute_all(effects, self)

    def _lifecycle_refused(self, event: Event, exc: LifecycleError) -> None:
        log.warning("lifecycle refused %s in %s", type(event).__name__, self.machine.state.value)
        self._error_event(exc.code, exc.message)

    def _transitioned(self) -> None:
        if self._head_done and self.machine.state is not self._published_lifecycle:
            self._publish_state()

    def _watch_probation(self) -> None:
        self._probation_next = self.monotonic()

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
        if not self.trusted.floor_moves(seq):
            return
        try:
            self.store.write_seq_floor(seq)
        except StorageError as exc:
            log.warning("cannot write the replay floor: %s", exc.message)  # the journal still has it; retried later
            return
        self.trusted.floor_saved(seq)

    def _on_message(self, msg: Message) -> None:
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            return
        if parsed.channel in (Channel.CHUNK, Channel.ARTIFACT):
            if not self._probe_chunk(msg.payload):
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

    def _kept_versions(self) -> ModelStore:
        return self.store

    def _save_desired(self, desired: DesiredState, blob: bytes) -> EdgeError | None:
        try:
            self.store.save_desired(_need(desired.artifact).artifact_id, blob)
        except StorageError as exc:
            return exc
        return None

    def _accepted(self, desired: DesiredState, blob: bytes, message: str) -> None:
        self.trusted.accepted(desired)
        try:
            self.store.save_last_desired(blob)
        except StorageError as exc:
            log.warning("cannot keep the desired state: %s", exc.message)
        self._event(
            EventKind.DESIRED_ACCEPTED,
            model=desired.model,
            deployment_id=desired.deployment_id,
            message=message,
            data={"action": desired.action, "seq": desired.seq},
        )

    def _purge(self, cmd: Command, seen: Seen) -> None:
        self._feed(seen)
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


__all__ = ["STOP", "Agent", "HostLike"]
