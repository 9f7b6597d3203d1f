"""Per-device budgets for what devices send the server (``[quotas]`` in server.toml).

Pure bookkeeping, no I/O: ``IngestBudget`` says whether a device's next message fits its
minute (events counted, bytes of every accepted message summed, in fixed one-minute windows
per device); ``ReportLimiter`` lets one ``quota.exceeded`` event per device and quota through
per minute, so reporting a flood never becomes one. ``QuotaStats`` holds the counters
``/metrics`` shows as ``edgefleet_quota_throttled_total{quota=...}``.
"""

from __future__ import annotations

import threading
from collections import Counter

from server.config import QuotasSection

WINDOW_S = 60.0
#: windows kept before stale ones are dropped (one per device that sent something this minute)
_PRUNE_AT = 10_000

#: quota names, as in the metric's label and the event's code (``quota_<name>``)
EVENTS, BYTES, CHUNK_RESENDS, RETAINED = "events", "bytes", "chunk_resends", "retained"


class IngestBudget:
    def __init__(self, quotas: QuotasSection) -> None:
        self.quotas = quotas
        self._windows: dict[str, list[float]] = {}  # device -> [window start, events, bytes]

    def admit(self, device_id: str, *, event: bool, size: int, now: float) -> str | None:
        """None when the message fits (and is counted), else the name of the quota it would bust."""
        w = self._windows.get(device_id)
        if w is None or now - w[0] >= WINDOW_S or now < w[0]:
            if len(self._windows) >= _PRUNE_AT:
                self._windows = {d: v for d, v in self._windows.items() if now - v[0] < WINDOW_S}
            w = self._windows[device_id] = [now, 0, 0]
        if event and w[1] + 1 > self.quotas.events_per_minute:
            return EVENTS
        if w[2] + size > self.quotas.bytes_per_minute:
            return BYTES
        w[1] += 1 if event else 0
        w[2] += size
        return None


class ReportLimiter:
    """At most one report per (device, quota) per minute."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def due(self, device_id: str, quota: str, now: float) -> bool:
        with self._lock:
            last = self._last.get((device_id, quota))
            if last is not None and 0 <= now - last < WINDOW_S:
                return False
            if len(self._last) >= _PRUNE_AT:
                self._last = {k: t for k, t in self._last.items() if now - t < WINDOW_S}
            self._last[(device_id, quota)] = now
            return True


class QuotaStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.throttled: Counter[str] = Counter()

    def throttle(self, quota: str, n: int = 1) -> None:
        with self.lock:
            self.throttled[quota] += n
