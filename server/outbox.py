"""Publishing what the registry owes the broker, and keeping signed desired states fresh.

Desired-state and command rows are written (signed) first and published second. ``flush``
publishes every row not yet published; it runs in the process holding the ``outbox`` lease,
so exactly one process publishes at a time and a crash between write and publish only
delays the message. Re-publishing a desired state is harmless (the agent ignores an identical
blob); a command is published once per row.

``housekeeping`` re-signs desired states ``resign_margin_s`` before they expire (new seq, same
content: the agent treats it as a no-op but its freeze detector sees a fresh expiry), expires
unanswered commands, and prunes telemetry and events past their retention.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.protocol.topics import Channel, device_topic
from server.config import ServerConfig
from server.errors import PublishError
from server.registry.fleet import CommandRecord, DesiredRecord, FleetRegistry, StoredDesired
from server.signing import Signer

log = logging.getLogger("edgefleet.outbox")

OUTBOX_LEASE = "outbox"
PRUNE_EVERY_S = 600.0


class Outbox:
    def __init__(
        self,
        registry: FleetRegistry,
        signer: Signer,
        config: ServerConfig,
        *,
        publish: Callable[[str, bytes, bool], None],
        owner: str,
        clock: Callable[[], float] = time.time,
        on_published: Callable[[str, int], None] | None = None,
    ) -> None:
        self.registry = registry
        self.signer = signer
        self.config = config
        self._publish = publish
        self.owner = owner
        self._clock = clock
        self._on_published = on_published
        self._last_prune = 0.0

    def holds_lease(self, now: float) -> bool:
        return self.registry.acquire_lease(OUTBOX_LEASE, self.owner, self.config.rollout.lease_ttl_s, now=now)

    def flush(self, now: float | None = None) -> int:
        """Publish every owed row, per device in seq order (a pin must not overtake its command)."""
        now = now or self._clock()
        owed: list[tuple[str, int, str, object]] = [
            (r.device_id, r.seq, "desired", r) for r in self.registry.unpublished_desired()
        ]
        owed += [(c.device_id, c.seq, "command", c) for c in self.registry.unpublished_commands(now)]
        owed.sort(key=lambda item: (item[0], item[1]))
        done: list[tuple[str, int]] = []
        sent: list[str] = []
        try:
            for device_id, seq, kind, row in owed:
                if kind == "desired":
                    assert isinstance(row, DesiredRecord)
                    self._publish(device_topic(device_id, Channel.DESIRED), row.blob, True)
                    done.append((device_id, seq))
                else:
                    assert isinstance(row, CommandRecord)
                    self._publish(device_topic(device_id, Channel.COMMAND), row.blob, False)
                    sent.append(row.command_id)
        finally:
            if done:
                self.registry.mark_desired_published(done)
                if self._on_published:
                    self._on_published("desired", len(done))
            if sent:
                self.registry.mark_commands_published(sent, self._clock())
                if self._on_published:
                    self._on_published("command", len(sent))
        return len(done) + len(sent)

    def housekeeping(self, now: float | None = None) -> None:
        now = now or self._clock()
        self.resign_expiring(now)
        self.registry.expire_commands(now)
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            r = self.config.retention
            t, e = self.registry.prune(telemetry_before=now - r.telemetry_s, events_before=now - r.events_s)
            if t or e:
                log.info("pruned %d telemetry buckets and %d events past retention", t, e)

    def resign_expiring(self, now: float) -> int:
        rows = self.registry.expiring_desired(now + self.config.publisher.resign_margin_s)
        if not rows:
            return 0
        blobs = {r.device_id: r.blob for r in rows}

        def sign(stored: StoredDesired) -> bytes:
            return self.signer.resign(blobs[stored.device_id], stored)

        with self.registry.tx() as tx:
            self.registry.store_desired(
                [(r.device_id, r.action, r.model, r.version, r.deployment_id) for r in rows],
                sign,
                ttl_s=self.config.publisher.desired_ttl_s,
                tx=tx,
                now=now,
            )
        log.info("re-signed %d desired state(s) before expiry", len(rows))
        return len(rows)


def safe_flush(outbox: Outbox, now: float) -> None:
    try:
        outbox.flush(now)
    except PublishError as exc:
        log.warning("outbox: %s (will retry)", exc)
