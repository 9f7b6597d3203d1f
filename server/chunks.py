"""Serving artifact chunks: a pure per-artifact schedule and the thread that publishes it.

Theory of operation (CONTRACTS.md section 3)
    Devices ask for the chunk ranges they lack (``ChunkRequest``). Per artifact the server
    collects requests for a short window (``window_s``), or until every device it expects
    has asked, then streams the union of what was asked once on the shared topic
    ``edgefleet/v1/art/{id}`` (a *round*). While a round runs, a request for chunks the stream
    has not reached yet is merged into it; chunks it already passed are remembered per device
    and, when the round ends, either streamed in another round (when at least
    ``late_threshold`` devices missed something) or sent on each requester's own
    ``down/chunk/{id}`` topic. In unicast mode every request is served per device.
    Rounds and per-device sends alternate so a late device is never starved.

    Asking again (quotas): a ``ResendLedger`` per artifact remembers which chunks each device has
    asked for. A chunk a device asks for a second time is a *resend*: it never opens or joins a
    broadcast round by itself; it is remembered as late, and streamed to everyone only when at
    least ``late_threshold`` devices missed something, otherwise sent on the device's own topic.
    Resends per device and artifact are budgeted (``[quotas] chunk_resend_factor`` x chunk count
    + ``chunk_resend_floor`` per ``RESEND_WINDOW_S``); over it, the request is refused
    (``ChunkQuotaError``), reported, and the device still gets what others' rounds stream.

    The schedule only says *what to send next*; ``ChunkServer`` reads the chunk from disk and
    publishes it through a paced link (bounded in-flight QoS 1), so the broker's queues never
    overflow and no thread exists per device. With ``egress_bytes_s`` a shared stream is also
    paced by its fan-out: after a chunk of L bytes that N devices are expected to take, that
    artifact waits L x N / egress_bytes_s, so the broker's egress (N copies of every chunk) stays
    near the budget instead of queueing gigabytes for slow subscribers (without it, 1,000 devices
    on one small machine stalled the broker's acknowledgements for over a minute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.protocol.messages import ChunkRequest
from agent.protocol.topics import Channel, artifact_topic, device_topic
from server.errors import ServerError
from server.fanout import FanoutPace

log = logging.getLogger("edgefleet.chunks")

#: artifacts whose expected devices are remembered (the most recent rollouts)
MAX_AUDIENCES = 64
#: the resend budget of a device for one artifact is renewed this often (a flaky device recovers)
RESEND_WINDOW_S = 600.0


class ChunkQuotaError(ServerError):
    """A device asked for one artifact's chunks again more often than its budget allows."""

    code = "quota"


class ResendLedger:
    """Which chunks of one artifact each device asked for, and how many it asked for again."""

    def __init__(self, chunk_count: int, limit: int | None, window_s: float = RESEND_WINDOW_S) -> None:
        self.chunk_count = chunk_count
        self.limit = limit
        self.window_s = window_s
        self._asked: dict[str, bytearray] = {}
        self._resent: dict[str, tuple[float, int]] = {}

    def split(self, device_id: str, indexes: list[int], now: float) -> tuple[list[int], list[int]]:
        """(first asks, resends); raises ChunkQuotaError, recording nothing, when resends bust the budget."""
        asked = self._asked.get(device_id)
        if asked is None:  # one bit per chunk: 1,000 devices x 16,000 chunks = 2 MB
            asked = self._asked[device_id] = bytearray((self.chunk_count + 7) // 8)
        first = [i for i in indexes if not asked[i >> 3] & (1 << (i & 7))]
        again = [i for i in indexes if asked[i >> 3] & (1 << (i & 7))]
        if again and self.limit is not None:
            start, n = self._resent.get(device_id, (now, 0))
            if now - start >= self.window_s:
                start, n = now, 0
            if n + len(again) > self.limit:
                raise ChunkQuotaError(
                    f"device {device_id} asked for {n + len(again)} chunks again (budget {self.limit} per "
                    f"{self.window_s:.0f} s for this artifact of {self.chunk_count} chunks)"
                )
            self._resent[device_id] = (start, n + len(again))
        for i in first:
            asked[i >> 3] |= 1 << (i & 7)
        return first, again


@dataclass(frozen=True)
class Send:
    index: int
    device_id: str | None  # None: broadcast on the shared topic


def _merged(ranges: Iterable[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """Ranges clamped to the artifact, sorted and merged: a request naming one range 1,024 times costs one."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((max(0, s), min(e, count)) for s, e in ranges):
        if start >= end:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class ArtifactSchedule:
    def __init__(
        self, chunk_count: int, *, broadcast: bool = True, window_s: float = 0.5, late_threshold: int = 3
    ) -> None:
        self.chunk_count = chunk_count
        self.broadcast = broadcast
        self.window_s = window_s
        self.late_threshold = late_threshold
        self._round = bytearray(chunk_count)  # 1 = to stream in the current/next round
        self._round_active = False
        self._cursor = 0
        self._window_opened: float | None = None
        self._requesters: set[str] = set()
        self._expected: frozenset[str] = frozenset()
        self._audience: set[str] = set()
        #: fan-out pacing: the last broadcast chunk went at ``paced_from`` (monotonic) and costs ``paced_s``
        #: seconds of the full budget; the sender leaves this artifact alone until ``paced_until``
        self.paced_from = 0.0
        self.paced_s = 0.0
        self.paced_until = 0.0
        self._late: dict[str, set[int]] = {}
        self._unicast: OrderedDict[str, list[int]] = OrderedDict()  # device -> indexes, descending
        self._prefer_unicast = False

    # -- input --------------------------------------------------------------------------------------

    def expect(self, device_ids: Iterable[str]) -> None:
        """Devices that will ask soon; once all have asked, the round need not wait for the window."""
        self._expected = frozenset(device_ids)
        self._audience.update(self._expected)

    @property
    def audience(self) -> int:
        """How many devices take this artifact's shared stream (expected or seen asking)."""
        return max(1, len(self._audience))

    def request(
        self, device_id: str, ranges: Iterable[tuple[int, int]], now: float, ledger: ResendLedger | None = None
    ) -> int:
        """Record a request; returns how many chunk indexes it named (after clamping to the artifact).

        With a ``ledger``, chunks this device asked for before are resends (see the module doc);
        raises ChunkQuotaError when they bust its budget."""
        indexes = [i for start, end in _merged(ranges, self.chunk_count) for i in range(start, end)]
        if not indexes:
            return 0
        again: list[int] = []
        if ledger is not None:
            indexes, again = ledger.split(device_id, indexes, now)
        self._audience.add(device_id)
        if not self.broadcast:
            self._queue_unicast(device_id, indexes + again)
            return len(indexes) + len(again)
        self._resend(device_id, again, now)
        if not indexes:
            return len(again)
        if self._round_active:
            for i in indexes:
                if i >= self._cursor:
                    self._round[i] = 1
                else:
                    self._late.setdefault(device_id, set()).add(i)
        else:
            for i in indexes:
                self._round[i] = 1
            self._requesters.add(device_id)
            if self._window_opened is None:
                self._window_opened = now
        return len(indexes) + len(again)

    def _resend(self, device_id: str, indexes: list[int], now: float) -> None:
        """Asked again: late (one device alone never makes a broadcast round), unless already on its way."""
        late = [i for i in indexes if not (self._round[i] and (not self._round_active or i >= self._cursor))]
        if not late:
            return
        self._late.setdefault(device_id, set()).update(late)
        if not self._round_active and self._window_opened is None:
            self._window_opened = now  # collect a window's resends, then settle them as a round ends

    def _queue_unicast(self, device_id: str, indexes: Iterable[int]) -> None:
        merged = set(self._unicast.get(device_id, ())) | set(indexes)
        self._unicast[device_id] = sorted(merged, reverse=True)

    # -- output -------------------------------------------------------------------------------------

    def _window_closed(self, now: float) -> bool:
        if self._window_opened is None:
            return False
        if self._expected and self._expected <= self._requesters:
            return True
        return now >= self._window_opened + self.window_s

    def next_send(self, now: float) -> Send | None:
        if not self._round_active and self._window_closed(now):
            self._round_active, self._cursor = True, 0
            self._window_opened = None
            self._requesters.clear()
        use_unicast = bool(self._unicast) and (self._prefer_unicast or not self._round_active)
        if not use_unicast and self._round_active:
            found = self._round.find(1, self._cursor)
            if found >= 0:
                self._round[found] = 0
                self._cursor = found + 1
                self._prefer_unicast = True
                return Send(found, None)
            self._end_round(now)
            if self._round_active:
                return self.next_send(now)
        if self._unicast:
            device_id, indexes = next(iter(self._unicast.items()))
            index = indexes.pop()
            del self._unicast[device_id]
            if indexes:
                self._unicast[device_id] = indexes  # to the back: round-robin between devices
            self._prefer_unicast = False
            return Send(index, device_id)
        return None

    def _end_round(self, now: float) -> None:
        self._round_active = False
        self._cursor = 0
        late, self._late = self._late, {}
        if len(late) >= self.late_threshold:
            for indexes in late.values():
                for i in indexes:
                    self._round[i] = 1
            self._round_active = True  # straight into another round: these devices are already waiting
        else:
            for device_id, indexes in late.items():
                self._queue_unicast(device_id, indexes)
        if not self._round_active and any(self._round):
            # requests that arrived for a future round while this one ran without merging
            self._window_opened = self._window_opened or now

    def deadline(self) -> float | None:
        """When the collecting window closes (for the sender's wait), if one is open."""
        if self._round_active or self._window_opened is None:
            return None
        return self._window_opened + self.window_s

    @property
    def idle(self) -> bool:
        return not self._round_active and self._window_opened is None and not self._unicast and not self._late

    @property
    def busy(self) -> bool:
        return self._round_active or bool(self._unicast)


class ChunkAccessError(ServerError):
    code = "chunk_access"


class ChunkServer:
    """One thread for every artifact being served (round-robin between artifacts)."""

    def __init__(
        self,
        *,
        read_chunk: Callable[[str, int], bytes],
        chunk_count: Callable[[str], int],
        authorize: Callable[[str, str], bool],
        publish: Callable[[str, bytes], None],
        broadcast: bool,
        window_s: float,
        late_threshold: int,
        on_reject: Callable[[ChunkRequest, str], None] | None = None,
        on_sent: Callable[[int, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        egress_bytes_s: float = 0.0,
        resend_limit: Callable[[int], int | None] = lambda count: None,
        on_throttled: Callable[[ChunkRequest, str], None] | None = None,
        pace: FanoutPace | None = None,
    ) -> None:
        self._pace = pace
        self._pace_lock = threading.Lock()
        self._resend_limit = resend_limit
        self._on_throttled = on_throttled
        self._ledgers: OrderedDict[str, ResendLedger] = OrderedDict()
        self._read_chunk = read_chunk
        self._chunk_count = chunk_count
        self._authorize = authorize
        self._publish = publish
        self._broadcast = broadcast
        self._window_s = window_s
        self._late_threshold = late_threshold
        self._on_reject = on_reject
        self._on_sent = on_sent
        self._clock = clock
        self._egress = egress_bytes_s
        self._cond = threading.Condition()
        self._inbox: list[ChunkRequest] = []
        self._expected: dict[str, set[str]] = {}
        self._schedules: OrderedDict[str, ArtifactSchedule] = OrderedDict()
        self._audiences: OrderedDict[str, set[str]] = OrderedDict()  # artifact -> devices dispatched to it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, req: ChunkRequest) -> None:
        """Called from the MQTT thread: cheap, never blocks on the registry or the broker."""
        with self._cond:
            self._inbox.append(req)
            self._cond.notify()

    def expect(self, artifact_id: str, device_ids: Iterable[str]) -> None:
        with self._cond:
            self._expected.setdefault(artifact_id, set()).update(device_ids)
            self._cond.notify()

    def observe_broker(self, source: str, topic: str, payload: bytes) -> None:
        """A broker $SYS counter (paho's thread, one per broker): feeds the fan-out pace."""
        if self._pace is None:
            return
        with self._pace_lock:
            now = self._clock()
            before = self._pace.factor(now)
            self._pace.observe(source, topic, payload, now)
            raised = self._pace.factor(now) > before
        if raised:  # a waiting stream may go sooner
            with self._cond:
                self._cond.notify()

    @property
    def pace(self) -> FanoutPace | None:
        """The fan-out pace (None: the fixed budget, or no budget); read it under no lock for a look only."""
        return self._pace

    def pace_state(self) -> tuple[float, int, int]:
        """(share of the fan-out budget in use, 1 = the configured one; lead in chunks; cuts so far)."""
        if self._pace is None:
            return 1.0, 0, 0
        with self._pace_lock:
            return self._pace.factor(self._clock()), self._pace.lead, self._pace.decreases

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgefleet-chunks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the sender thread ----------------------------------------------------------------------------

    def _schedule_for(self, artifact_id: str) -> ArtifactSchedule:
        sched = self._schedules.get(artifact_id)
        if sched is None:
            sched = ArtifactSchedule(
                self._chunk_count(artifact_id),
                broadcast=self._broadcast,
                window_s=self._window_s,
                late_threshold=self._late_threshold,
            )
            # an idle schedule is dropped, but who is expected outlives it: the requests come after
            if artifact_id in self._audiences:
                sched.expect(self._audiences[artifact_id])
            self._schedules[artifact_id] = sched
        return sched

    def _take_inbox(self) -> tuple[list[ChunkRequest], dict[str, set[str]]]:
        with self._cond:
            inbox, self._inbox = self._inbox, []
            expected, self._expected = self._expected, {}
        return inbox, expected

    def _accept(self, now: float) -> None:
        inbox, expected = self._take_inbox()
        for artifact_id, devices in expected.items():
            audience = self._audiences.pop(artifact_id, set()) | devices
            self._audiences[artifact_id] = audience
            while len(self._audiences) > MAX_AUDIENCES:
                self._audiences.popitem(last=False)
            try:
                self._schedule_for(artifact_id).expect(audience)
            except ServerError as exc:
                log.warning("cannot expect requests for %s: %s", artifact_id, exc)
        for req in inbox:
            try:
                if not self._authorize(req.device_id, req.artifact_id):
                    raise ChunkAccessError(f"device {req.device_id} is not a recipient of artifact {req.artifact_id}")
                sched = self._schedule_for(req.artifact_id)
                if any(end > sched.chunk_count for _, end in req.ranges):
                    raise ChunkAccessError(
                        f"request names chunks beyond the artifact's {sched.chunk_count} chunks"
                    )
                sched.request(req.device_id, req.ranges, now, self._ledger_for(req.artifact_id, sched.chunk_count))
            except ChunkQuotaError as exc:
                if self._on_throttled is not None:
                    self._on_throttled(req, str(exc))
            except ServerError as exc:
                if self._on_reject is not None:
                    self._on_reject(req, str(exc))

    def _ledger_for(self, artifact_id: str, chunk_count: int) -> ResendLedger:
        """Outlives the schedule (dropped when idle): asking again later is still asking again."""
        ledger = self._ledgers.pop(artifact_id, None)
        if ledger is None:
            ledger = ResendLedger(chunk_count, self._resend_limit(chunk_count))
        self._ledgers[artifact_id] = ledger
        while len(self._ledgers) > MAX_AUDIENCES:
            self._ledgers.popitem(last=False)
        return ledger

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            self._accept(now)
            sent = False
            factor = self._pace_factor(now)
            for artifact_id in list(self._schedules):
                sched = self._schedules[artifact_id]
                # the wait follows the pace as it changes: a stream cut to 1/16 resumes as soon as it is raised
                sched.paced_until = sched.paced_from + sched.paced_s / factor
                if sched.paced_until > now:
                    continue
                step = sched.next_send(now)
                if step is not None:
                    size = self._send(artifact_id, step)
                    if self._egress > 0 and step.device_id is None:
                        self._note_chunk(size)
                        sched.paced_from, sched.paced_s = now, size * sched.audience / self._egress
                        sched.paced_until = now + sched.paced_s / factor
                    sent = True
                elif sched.idle:
                    del self._schedules[artifact_id]
            if sent:
                continue
            deadlines = [d for s in self._schedules.values() if (d := s.deadline()) is not None]
            deadlines += [s.paced_until for s in self._schedules.values() if s.paced_until > now]
            timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else 1.0
            with self._cond:
                if not self._inbox and not self._stop.is_set():
                    self._cond.wait(timeout=min(timeout, 1.0) if timeout > 0 else 0.005)

    def _pace_factor(self, now: float) -> float:
        if self._pace is None:
            return 1.0
        with self._pace_lock:
            return self._pace.factor(now)

    def _note_chunk(self, size: int) -> None:
        if self._pace is not None and size > 0:
            with self._pace_lock:
                self._pace.note_chunk(size)

    def _send(self, artifact_id: str, step: Send) -> int:
        try:
            data = self._read_chunk(artifact_id, step.index)
            topic = (
                artifact_topic(artifact_id)
                if step.device_id is None
                else device_topic(step.device_id, Channel.CHUNK, artifact_id)
            )
            self._publish(topic, data)
        except ServerError as exc:
            log.error("cannot send chunk %d of %s: %s", step.index, artifact_id, exc)  # noqa: TRY400 - expected, no trace
            return 0
        if self._on_sent is not None:
            self._on_sent(len(data), step.device_id is None)
        return len(data)
