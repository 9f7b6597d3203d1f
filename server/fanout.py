"""The broadcast fan-out pace that follows the subscribers: a pure controller fed by the broker's own counters.

Theory of operation
    A shared chunk stream (``edgefleet/v1/art/{id}``) is paced by a fan-out budget
    (``publisher.broadcast_egress_mb_s``, see server/chunks.py). A fixed budget is right only while
    every subscriber keeps up: when they fall behind (a loaded machine, slow devices), the broker
    holds each chunk until the slowest subscriber has acknowledged it, its per-client queues fill
    (``max_queued_bytes``), overflow and drop, and the devices re-request what they lost.

    The broker says how far the stream is ahead of its slowest subscriber: mosquitto publishes
    ``$SYS/broker/store/messages/count`` (every message it still holds) and
    ``$SYS/broker/retained messages/count`` every ``sys_interval`` (1 s in ``edgefleet broker
    config``; a pass came every ~2 s here) when they changed, after ``$SYS/broker/uptime``, and
    ``$SYS/broker/store/messages/bytes`` (their payload bytes, retained included); one sample a pass,
    at ``$SYS/broker/bytes/sent`` (after those, and changed in every pass for a $SYS subscriber). A
    broadcast chunk is stored once, shared by every subscriber's queue, and freed when the last one
    has acknowledged it, so the held messages that are not retained, over their
    recent minimum (``baseline_s``: other sessions' leftovers and chunks pinned by an offline
    persistent session are in the minimum), are the chunks no longer acknowledged by at least one
    subscriber: the *lead*, in chunks (``chunk_bytes``, the last chunk streamed, turns
    ``max_lead_bytes`` into chunks). Device messages on their way to the server are held too (a
    thousand chunk requests as a rollout starts, ``download.progress`` events at each quarter), and
    so the lead is also bounded by the held bytes over their minimum (in chunks: a burst of small
    messages is few bytes; the retained desired states a rollout adds are many bytes but cancel out
    of the message count), and it may grow from one sample to the next by no more than the chunks
    streamed in the two intervals before it (``note_chunk``).

    ``FanoutPace`` turns those samples into a factor of the budget (AIMD): a lead above
    ``max_lead_bytes``, not shrinking, halves the factor (at most once per ``hold_s``, 3.5 s: every
    other pass, so a cut shows in the lead before the next; cutting every pass fell to the floor in
    8 s and left the subscribers idle; a sample is up to a pass old and the lead overshoots the limit
    by a few seconds of the stream: keep the limit near half of the broker's per-client queue), a lead
    under half of it raises the factor by ``increase`` per sample, up to 1. The factor never falls
    under ``floor``. It starts at 1, so a fleet that keeps up is streamed exactly as with the fixed
    budget; without samples (another broker, an ACL without ``$SYS``) for ``stale_s`` the factor is
    1 again.

    Pure: no clock, no I/O; the MQTT link feeds ``observe`` and the chunk server reads ``factor``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: the broker counters the pace follows (mosquitto 2.0, sys_interval)
STORED_TOPIC = "$SYS/broker/store/messages/count"
STORED_BYTES_TOPIC = "$SYS/broker/store/messages/bytes"
RETAINED_TOPIC = "$SYS/broker/retained messages/count"
UPTIME_TOPIC = "$SYS/broker/uptime"
#: published after the store and retained counters in each pass, and changed in every pass for a subscriber of
#: $SYS (the uptime it was sent last pass): the end of a pass
LAST_COUNTER_TOPIC = "$SYS/broker/bytes/sent"
SYS_TOPICS = (UPTIME_TOPIC, STORED_TOPIC, STORED_BYTES_TOPIC, RETAINED_TOPIC, LAST_COUNTER_TOPIC)


def parse_counter(payload: bytes, limit: int = 1 << 62) -> int | None:
    """A $SYS counter's payload (ASCII digits) as an int, or None when it is not one (untrusted input)."""
    if not payload or len(payload) > 20 or not payload.isdigit():
        return None
    value = int(payload)
    return value if value <= limit else None


@dataclass(frozen=True)
class PaceSettings:
    max_lead_bytes: int = 1 << 20
    floor: float = 1 / 16
    increase: float = 0.25
    hold_s: float = 3.5
    baseline_s: float = 30.0
    stale_s: float = 5.0


class FanoutPace:
    """What share of the fan-out budget the next chunks may use, from samples of the broker's held messages."""

    def __init__(self, settings: PaceSettings | None = None) -> None:
        self.settings = settings or PaceSettings()
        self.chunk_bytes = 64 * 1024
        self._factor = 1.0
        self._retained: dict[str, int] = {}
        self._stored: dict[str, int] = {}
        self._stored_bytes: dict[str, int] = {}
        self._pass_sampled: dict[str, bool] = {}
        self._samples: dict[str, deque[tuple[float, int, int | None]]] = {}
        self._last_sample = float("-inf")
        self._last_decrease = float("-inf")
        self._lead_prev = 0
        self._sent = 0
        self._sent_before = 0
        self.lead = 0
        self.decreases = 0
        self.samples = 0

    @classmethod
    def for_settings(cls, broadcast: bool, egress_mb_s: float, max_lead_kib: int) -> FanoutPace | None:
        """The pace for ``[publisher]`` settings: only shared streams with a fan-out budget are paced."""
        if not broadcast or egress_mb_s <= 0 or max_lead_kib <= 0:
            return None
        return cls(PaceSettings(max_lead_bytes=max_lead_kib * 1024))

    def note_chunk(self, size: int) -> None:
        """A broadcast chunk of ``size`` bytes went out (the lead's unit)."""
        self.chunk_bytes = max(1, size)
        self._sent += 1

    def observe(self, source: str, topic: str, payload: bytes, now: float) -> None:
        """One $SYS message from the broker ``source`` (several brokers: the largest lead counts)."""
        value = parse_counter(payload.split(b" ", 1)[0])  # uptime is "12 seconds"
        if value is None:
            return
        # held = stored - retained, may be negative (mosquitto counts its own $SYS messages as retained, not
        # as stored). A pass publishes uptime first, then only the counters that changed (store count, store
        # bytes, retained count, ..., bytes sent): one sample per pass, at its end (bytes sent), or at the next
        # uptime if the end was not seen
        if topic == RETAINED_TOPIC:
            self._retained[source] = value
        elif topic == STORED_TOPIC:
            self._stored[source] = value
        elif topic == STORED_BYTES_TOPIC:
            self._stored_bytes[source] = value
        elif (topic == LAST_COUNTER_TOPIC or (topic == UPTIME_TOPIC and not self._pass_sampled.get(source, False))) \
                and source in self._retained and source in self._stored:
            self.sample(source, now, self._stored[source] - self._retained[source], self._stored_bytes.get(source))
        if topic == UPTIME_TOPIC:
            self._pass_sampled[source] = False
        elif topic == LAST_COUNTER_TOPIC:
            self._pass_sampled[source] = True

    def sample(self, source: str, now: float, held: int, stored_bytes: int | None = None) -> None:
        """``held``: messages the broker ``source`` holds that are not retained; ``stored_bytes``: the payload
        bytes of all it holds (retained included), when known."""
        s = self.settings
        samples = self._samples.setdefault(source, deque())
        samples.append((now, held, stored_bytes))
        while samples[0][0] < now - s.baseline_s:
            samples.popleft()
        self._last_sample = now
        self.samples += 1
        held_over = max((self._over(q) for q in self._samples.values() if q[-1][0] >= now - s.stale_s), default=0)
        # the lead grows by at most the chunks streamed since the last sample: a burst of device messages
        # (a thousand chunk requests as a rollout starts, telemetry) held on their way to the server is not one
        # (chunks of the interval before count too: a chunk sent just before a pass is counted in the next)
        lead = min(held_over, self._lead_prev + self._sent + self._sent_before)
        self._sent, self._sent_before = 0, self._sent
        limit = max(2, s.max_lead_bytes // self.chunk_bytes)
        shrinking, self._lead_prev, self.lead = lead < self._lead_prev, lead, lead
        if lead > limit:
            if not shrinking and now - self._last_decrease >= s.hold_s and self._factor > s.floor:
                self._factor = max(s.floor, self._factor / 2)
                self._last_decrease = now
                self.decreases += 1
        elif lead < limit / 2:
            self._factor = min(1.0, self._factor + s.increase)

    def _over(self, q: deque[tuple[float, int, int | None]]) -> int:
        """One broker's held messages over their minimum, and no more than its held bytes over theirs allow in
        chunks: a burst of small device messages is many messages but few bytes; retained desired states
        (1.8 KB each, new as a rollout starts) are many bytes but cancel out of the message count."""
        over = q[-1][1] - min(v for _, v, _ in q)
        last_bytes = q[-1][2]
        if last_bytes is not None:
            known = [b for _, _, b in q if b is not None]
            over = min(over, (last_bytes - min(known)) // self.chunk_bytes)
        return over

    def factor(self, now: float) -> float:
        """The share of the budget to use now: 1 unless recent samples say the subscribers lag."""
        if now - self._last_sample > self.settings.stale_s:
            return 1.0
        return self._factor
