"""Taking over a dead peer's MQTT session: several servers behind shared subscriptions lose nothing when one
dies and is not restarted.

Why (measured with mosquitto 2.0.11, docs/scale.md "A server killed and not restarted"): each server's session
is persistent (``clean_session`` false) so that device events wait in the broker while it restarts. A member of
a shared subscription keeps its share while its session lives, process or not: mosquitto goes on routing the
dead member's turn of ``$share/edgefleet-server/...`` into its session queue and never re-routes it
(eclipse-mosquitto/mosquitto#2662), and the session outlives the process. Making the sessions clean instead
would drop the QoS 1 messages in flight to the dead member and every device event sent while no server is up.

So each server renews a lease on its own broker client id (``mqtt-session:<client id>``, owner = the client id,
so a restart renews it at once) from a thread of its own, several times per ``ttl_s`` (not from the control
loop: a long rollout tick under load must not make a live server look dead, since taking over a live session
disconnects its owner). A server that finds a peer's lease expired takes the
``mqtt-drain:<client id>`` lease (one survivor per dead peer) and connects to every broker **with the peer's
client id**, resuming its session: the broker hands over what it queued there (and what was in flight) and
goes on sending that member's share to the survivor, whose ingest writes it like its own. No subscription is
made (the session has them) and paho does not reconnect: when the peer comes back, its connection takes the
session back (the broker drops the survivor's), its lease is renewed, and the survivor lets go.

A secured broker binds client ids to logins (``use_username_as_clientid``, the generated config): there each
server's client id is its login, and the survivor connects **as the peer's login** (``[broker] peer_logins``,
whose passwords the server reads at start; ``connect`` does that). A peer it has no login for is not taken
(``may_take``): connecting with its own login would take over its own session instead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from server.errors import ServerError

log = logging.getLogger("edgefleet.takeover")

SESSION_LEASE = "mqtt-session:"
DRAIN_LEASE = "mqtt-drain:"


class Link(Protocol):
    """What a takeover needs of ``publisher.MqttLink``."""

    connected: threading.Event
    def start(self, *, wait_s: float = 10.0) -> None: ...
    def stop(self) -> None: ...


class Leases(Protocol):
    """What a takeover needs of the registry (``OutboxTables``)."""

    def acquire_lease(self, name: str, owner: str, ttl_s: float, *, now: float | None = None) -> bool: ...
    def release_lease(self, name: str, owner: str) -> None: ...
    def leases_named(self, prefix: str) -> dict[str, tuple[str, float]]: ...


class SessionTakeover:
    def __init__(self, leases: Leases, *, owner: str, client_id: str, ttl_s: float,
                 connect: Callable[[str], Sequence[Link]], may_take: Callable[[str], bool] = lambda peer: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.leases = leases
        self.owner = owner
        self.client_id = client_id
        self.ttl_s = ttl_s
        self._connect = connect  # peer client id -> links to every broker with it, not started
        self._may_take = may_take  # False: no login to resume that peer's session with
        self._refused: set[str] = set()  # peers whose sessions we cannot take, already logged
        self._clock = clock
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.held: dict[str, Sequence[Link]] = {}
        self._seen_up: set[str] = set()  # held sessions whose links have connected
        self._handed_back: dict[str, float] = {}  # client id -> when its session was taken back

    def start(self) -> SessionTakeover:
        """Take our session lease and keep renewing it (every ttl_s / 5) until ``stop``."""
        self.renew()
        self._heartbeat = threading.Thread(target=self._renewing, name="edgefleet-session-lease", daemon=True)
        self._heartbeat.start()
        return self

    def renew(self) -> None:
        self.leases.acquire_lease(SESSION_LEASE + self.client_id, self.client_id, self.ttl_s, now=self._clock())

    def _renewing(self) -> None:
        while not self._stopped.wait(self.ttl_s / 5):
            try:
                self.renew()
            except Exception:  # the registry is unreachable: peers may take over; retry next time
                log.exception("cannot renew the session lease of %s", self.client_id)

    def step(self, now: float | None = None) -> None:
        """Take over the sessions of dead peers; let go of those that came back."""
        now = self._clock() if now is None else now
        for name, (_, expires_at) in self.leases.leases_named(SESSION_LEASE).items():
            peer = name[len(SESSION_LEASE):]
            if peer == self.client_id:
                continue
            if expires_at >= now:  # alive, or back
                self._let_go(peer)
                continue
            if peer in self.held:
                if not self.leases.acquire_lease(DRAIN_LEASE + peer, self.owner, self.ttl_s, now=now):
                    self._let_go(peer)  # another survivor has it
                elif any(link.connected.is_set() for link in self.held[peer]):
                    self._seen_up.add(peer)
                elif peer in self._seen_up:
                    self._let_go(peer, handed_back=True)  # the broker gave the session to someone else
                continue
            if now - self._handed_back.get(peer, -1e9) < self.ttl_s:
                continue  # it was just taken back: give the peer's lease time to show it
            if not self._may_take(peer):
                if peer not in self._refused:
                    self._refused.add(peer)
                    log.error("server session %s: its lease expired, but it is not in [broker] peer_logins: what "
                              "the broker queues for it waits until that server comes back", peer)
                continue
            if self.leases.acquire_lease(DRAIN_LEASE + peer, self.owner, self.ttl_s, now=now):
                self._take(peer)

    def _take(self, peer: str) -> None:
        links = list(self._connect(peer))
        log.warning("server session %s: its lease expired; taking it over to receive what the broker queued for it",
                    peer)
        for link in links:
            link.start(wait_s=0)
        self.held[peer] = links

    def _let_go(self, peer: str, *, handed_back: bool = False) -> None:
        links = self.held.pop(peer, None)
        self._seen_up.discard(peer)
        if links is None:
            return
        log.info("server session %s: letting go (%s)", peer, "taken back" if handed_back else "its server is back")
        self._handed_back[peer] = self._clock()
        for link in links:
            with contextlib.suppress(Exception):
                link.stop()
        with contextlib.suppress(ServerError):
            self.leases.release_lease(DRAIN_LEASE + peer, self.owner)

    def stop(self) -> None:
        """Let go of every taken session, and end our own lease (expired, not deleted: peers judge by it) so that a
        peer drains what the broker queues for our session from now on."""
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        for peer in list(self.held):
            self._let_go(peer)
        with contextlib.suppress(ServerError):
            self.leases.acquire_lease(SESSION_LEASE + self.client_id, self.client_id, 0.0, now=self._clock() - 1.0)

