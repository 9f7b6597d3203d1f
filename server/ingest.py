"""Ingest of everything devices publish: state, telemetry, events, chunk requests, enrollment.

Theory of operation
    paho hands each message to ``submit`` on its network thread. Chunk requests go straight to
    the chunk server (it must answer within its aggregation window); everything else is queued
    and written by one ingest thread in batches (up to ``max_batch`` messages or
    ``max_delay_s``, one transaction per batch), so a thousand devices reporting at once cost
    a handful of transactions, not a thousand.

    Every message is checked before it is trusted: the topic must parse, the payload must
    decode under its type's size cap (``decode_up``), the device id inside must match the
    topic's, and the device must be registered and not revoked (an enrollment request is the
    one message an unknown device may send). Anything else is rejected as a typed error:
    counted in the metrics and recorded as an ``ingest.rejected`` event (rate-limited per
    device, so a broken device cannot flood the registry). Nothing a device sends can stop
    the ingest thread.

    Quotas (``server.quotas``, ``[quotas]``): each registered device's accepted messages are
    budgeted per minute (events counted, bytes summed); the excess is dropped, counted
    (``edgefleet_quota_throttled_total``) and reported once a minute as ``quota.exceeded``.
    Only ``up/state`` may hold a retained message: one seen retained on another up-leaf (on
    subscribe, or the periodic sweep) is not ingested but cleared by the control loop
    (``clear_stray_retained``), counted and reported the same way.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import EdgeError, MalformedMessageError, TopicError
from agent.protocol.messages import (
    ChunkRequest,
    EnrollRequest,
    Event,
    Measurement,
    StateReport,
    Telemetry,
    UpMessage,
    decode_up,
)
from agent.protocol.topics import Channel, parse_topic
from server.config import QuotasSection
from server.errors import ServerError
from server.identity import device_id_problem, server_logins
from server.quotas import RETAINED, IngestBudget, QuotaStats, ReportLimiter
from server.registry.fleet import DEVICE_ACTIVE, DEVICE_REVOKED, EnrollmentRequest, FleetRegistry, IngestBatch
from server.rollout.progress import ProgressTracker
from server.signing import fingerprint

log = logging.getLogger("edgefleet.ingest")

_EXPECTED_TYPE = {
    Channel.STATE: "state",
    Channel.TELEMETRY: "telemetry",
    Channel.EVENT: "event",
    Channel.CHUNK_REQUEST: "chunk_request",
    Channel.ENROLL: "enroll",
    Channel.MEASUREMENT: "measurement",
}
#: Rejections recorded per device per minute (all are counted in the metrics).
REJECTS_RECORDED_PER_MINUTE = 10


@dataclass(frozen=True)
class Rejection:
    device_id: str | None
    code: str
    message: str
    topic: str


class IngestStats:
    """Counters for /metrics (per process, as Prometheus expects)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.batches = 0
        self.batch_seconds = 0.0

    def count(self, kind: str) -> None:
        with self.lock:
            self.received[kind] += 1

    def reject(self, code: str) -> None:
        with self.lock:
            self.rejected[code] += 1


class Ingestor:
    def __init__(
        self,
        registry: FleetRegistry,
        progress: ProgressTracker,
        *,
        bucket_s: float,
        on_chunk_request: Callable[[ChunkRequest], None] | None = None,
        on_written: Callable[[bool], None] | None = None,
        max_batch: int = 500,
        max_delay_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        quotas: QuotasSection | None = None,
        reserved_logins: frozenset[str] = server_logins(),
    ) -> None:
        self.reserved_logins = reserved_logins
        self.budget = IngestBudget(quotas or QuotasSection())
        self.reports = ReportLimiter()
        self.quota_stats = QuotaStats()
        self._stray: dict[str, str] = {}  # topic -> device id: retained where only up/state may be
        self._stray_lock = threading.Lock()
        self.registry = registry
        self.progress = progress
        self.bucket_s = bucket_s
        self._on_chunk_request = on_chunk_request
        self._on_written = on_written
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._clock = clock
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._reject_window: dict[str | None, tuple[float, int]] = {}
        self.stats = IngestStats()

    # -- paho's thread ------------------------------------------------------------------------------

    def submit(self, topic: str, payload: bytes, retained: bool = False) -> None:
        if retained and payload and not topic.endswith("/" + Channel.STATE.value) and self._note_stray(topic):
            return  # a stale copy kept by the broker: cleared, never ingested
        if topic.endswith("/" + Channel.CHUNK_REQUEST.value) and self._on_chunk_request is not None:
            try:
                parsed = parse_topic(topic)
                msg = decode_up(payload, "chunk_request")
                assert isinstance(msg, ChunkRequest)
                if msg.device_id != parsed.device_id:
                    raise MalformedMessageError("device_id differs from the topic's device", field="device_id")
            except EdgeError:
                self._queue.put((topic, payload))  # the ingest thread records the rejection
                return
            self.stats.count("chunk_request")
            self._on_chunk_request(msg)
            return
        self._queue.put((topic, payload))

    def _note_stray(self, topic: str) -> bool:
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return False
        if parsed.device_id is None or parsed.channel not in _EXPECTED_TYPE:
            return False
        with self._stray_lock:
            self._stray[topic] = parsed.device_id
        return True

    # -- quotas (control loop and chunk threads) -------------------------------------------------------

    def clear_stray_retained(self, publish: Callable[[str, bytes, bool], None], now: float) -> int:
        """Clear every retained message noted on a leaf that must not keep one; returns how many."""
        with self._stray_lock:
            stray, self._stray = self._stray, {}
        for topic, device_id in stray.items():
            try:
                publish(topic, b"", True)
            except ServerError as exc:
                log.warning("cannot clear the retained message on %s: %s", topic, exc)
                with self._stray_lock:
                    self._stray.setdefault(topic, device_id)
                continue
            self.throttled(device_id, RETAINED, f"cleared a retained message on {topic} (only up/state may "
                           "keep one)", now)
        return len(stray)

    def throttled(self, device_id: str, quota: str, detail: str, now: float, *, record: bool = True) -> None:
        """Count one throttled message; with ``record``, write the minute's ``quota.exceeded`` event if due."""
        self.quota_stats.throttle(quota)
        if record and self.reports.due(device_id, quota, now):
            with contextlib.suppress(ServerError):
                self.registry.server_event("quota.exceeded", f"device {device_id} over its {quota} quota: {detail}",
                                           device_id=device_id, severity="warning", code=f"quota_{quota}",
                                           data={"quota": quota}, now=now)

    # -- the ingest thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgefleet-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + self._max_delay
            stop = False
            while len(items) < self._max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            try:
                self.process(items)
            except Exception:  # the registry is down or a bug: log, keep the thread alive
                log.exception("ingest batch of %d message(s) failed", len(items))
            if stop:
                return

    def process(self, items: list[tuple[str, bytes]]) -> None:
        """Decode, check and write one batch (public for tests and the simulator)."""
        started = time.monotonic()
        now = self._clock()
        decoded: list[tuple[Channel, str, UpMessage, int]] = []
        rejections: list[Rejection] = []
        for topic, payload in items:
            try:
                parsed = parse_topic(topic)
            except TopicError as exc:
                rejections.append(Rejection(None, exc.code, exc.message, topic))
                continue
            device_id = parsed.device_id
            if parsed.channel not in _EXPECTED_TYPE or device_id is None:
                continue  # down-topics echo (we never subscribe to them); nothing to do
            if not payload:
                continue  # a cleared retained message
            try:
                msg = decode_up(payload, _EXPECTED_TYPE[parsed.channel])
            except EdgeError as exc:
                rejections.append(Rejection(device_id, exc.code, exc.message, topic))
                continue
            if getattr(msg, "device_id", None) != device_id:
                rejections.append(Rejection(device_id, "device_mismatch",
                                            f"message names device {getattr(msg, 'device_id', None)!r}", topic))
                continue
            decoded.append((parsed.channel, device_id, msg, len(payload)))
        statuses = self._statuses({d for _, d, _, _ in decoded})
        batch = IngestBatch()
        enrolls: list[EnrollRequest] = []
        for channel, device_id, msg, size in decoded:
            status = statuses.get(device_id)
            if isinstance(msg, EnrollRequest):
                enrolls.append(msg)
                continue
            if status is None:
                rejections.append(Rejection(device_id, "unknown_device", "device is not registered",
                                            f"{channel.value}"))
                if isinstance(msg, StateReport):
                    batch.unregistered_states.append(msg)  # applied if the operator approves or registers it
                continue
            if status == DEVICE_REVOKED:
                rejections.append(Rejection(device_id, "revoked", "device is revoked", channel.value))
                continue
            over = self.budget.admit(device_id, event=isinstance(msg, Event), size=size, now=now)
            if over is not None:
                self.quota_stats.throttle(over)
                if self.reports.due(device_id, over, now):
                    q = self.budget.quotas
                    batch.server_events.append((
                        device_id, "quota.exceeded", "warning",
                        f"device {device_id} over its {over} quota ({q.events_per_minute} events, "
                        f"{q.bytes_per_minute} bytes per minute): the excess is dropped", f"quota_{over}",
                        {"quota": over, "channel": channel.value},
                    ))
                continue
            self.stats.count(channel.name.lower())
            if isinstance(msg, StateReport):
                batch.states.append(msg)
            elif isinstance(msg, Telemetry):
                batch.telemetry.append(msg)
            elif isinstance(msg, Event):
                batch.events.append(msg)
            elif isinstance(msg, Measurement):
                batch.measurements.append(msg)
            elif isinstance(msg, ChunkRequest) and self._on_chunk_request is not None:
                self._on_chunk_request(msg)
        for r in rejections:
            self.stats.reject(r.code)
            if self._should_record(r.device_id, now):
                batch.server_events.append(
                    (r.device_id, "ingest.rejected", "warning", f"{r.code}: {r.message}"[:500], r.code,
                     {"topic": r.topic[:256]})
                )
        if batch or enrolls:
            self.progress.changed = False
            self.registry.write_ingest(
                batch, bucket_s=self.bucket_s, now=now, on_event=self.progress.on_event,
                on_state=self.progress.on_state, prefetch=self.progress.prefetch,
            )
            for req in enrolls:
                self._enroll(req, statuses.get(req.device_id), now)
            if self._on_written is not None:
                self._on_written(self.progress.changed)
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.batch_seconds += time.monotonic() - started

    def _statuses(self, device_ids: set[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        return self.registry.device_statuses(device_ids)

    def _should_record(self, device_id: str | None, now: float) -> bool:
        start, n = self._reject_window.get(device_id, (now, 0))
        if now - start >= 60.0:
            start, n = now, 0
        self._reject_window[device_id] = (start, n + 1)
        return n < REJECTS_RECORDED_PER_MINUTE

    def _enroll(self, req: EnrollRequest, status: str | None, now: float) -> None:
        key = base64.b64encode(req.public_key).decode()
        self.stats.count("enroll")
        problem = device_id_problem(req.device_id, self.reserved_logins)
        if problem is not None:
            self.stats.reject("reserved_id")
            if self._should_record(req.device_id, now):
                with contextlib.suppress(ServerError):
                    self.registry.server_event("enroll.refused", problem, device_id=req.device_id,
                                               severity="warning", code="reserved_id", now=now)
            return
        try:
            with self.registry.tx() as tx:
                if status == DEVICE_REVOKED:
                    self.registry.server_event("enroll.refused", f"revoked device {req.device_id} asked to enroll",
                                               device_id=req.device_id, severity="warning", code="revoked", tx=tx,
                                               now=now)
                    return
                if status == DEVICE_ACTIVE and self.registry.device_public_key(tx, req.device_id) == key:
                    return  # already enrolled with this key: a re-sent request
                fresh = self.registry.record_enroll_request(
                    EnrollmentRequest(
                        device_id=req.device_id,
                        public_key=key,
                        fingerprint=fingerprint(key),
                        profile=req.profile,
                        agent_version=req.agent_version,
                        arch=req.arch,
                        hostname=req.hostname,
                        requested_at=req.ts,
                        received_at=now,
                        status="pending",
                    ),
                    tx=tx,
                )
                if fresh:
                    what = "a new key" if status == DEVICE_ACTIVE else "enrollment"
                    self.registry.server_event(
                        "enroll.requested",
                        f"device {req.device_id} ({req.profile}) requests {what}; key fingerprint "
                        f"{fingerprint(key)}. Approve with `edgefleet devices approve {req.device_id}`",
                        device_id=req.device_id, severity="warning" if status == DEVICE_ACTIVE else "info",
                        data={"fingerprint": fingerprint(key), "profile": req.profile}, tx=tx, now=now,
                    )
        except ServerError as exc:
            log.warning("enrollment request from %s not recorded: %s", req.device_id, exc)
