"""SessionTakeover (server/takeover.py): which peers' MQTT sessions a server resumes and when it lets go."""

from __future__ import annotations

import threading

from server.takeover import DRAIN_LEASE, SESSION_LEASE, SessionTakeover


class Leases:
    """The registry's lease semantics (``OutboxTables.acquire_lease``) in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, float]] = {}

    def acquire_lease(self, name: str, owner: str, ttl_s: float, *, now: float | None = None) -> bool:
        assert now is not None
        held = self.rows.get(name)
        if held is not None and held[0] != owner and held[1] >= now:
            return False
        self.rows[name] = (owner, now + ttl_s)
        return True

    def release_lease(self, name: str, owner: str) -> None:
        if self.rows.get(name, ("", 0.0))[0] == owner:
            del self.rows[name]

    def leases_named(self, prefix: str) -> dict[str, tuple[str, float]]:
        return {k: v for k, v in self.rows.items() if k.startswith(prefix)}


class Link:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.connected = threading.Event()
        self.started = self.stopped = False

    def start(self, *, wait_s: float = 10.0) -> None:
        self.started = True
        self.connected.set()

    def stop(self) -> None:
        self.stopped = True
        self.connected.clear()


def _server(leases: Leases, name: str, clock: list[float], links: list[Link]) -> SessionTakeover:
    def connect(peer: str) -> list[Link]:
        made = [Link(peer), Link(peer)]  # two shards
        links.extend(made)
        return made

    return SessionTakeover(leases, owner=f"{name}:1", client_id=name, ttl_s=5.0, connect=connect,
                           clock=lambda: clock[0])


def test_only_a_dead_peer_is_taken_over_by_one_survivor_and_let_go_when_it_is_back() -> None:
    leases, clock = Leases(), [100.0]
    links: list[Link] = []
    a, b, c = (_server(leases, n, clock, links) for n in ("a", "b", "c"))
    for s in (a, b, c):
        s.renew()
    a.step()
    assert a.held == {} and links == []  # everyone alive: nothing taken

    clock[0] = 104.0
    a.renew()
    b.renew()  # c died at 100 and renews no more
    clock[0] = 106.0
    a.step()
    b.step()
    assert list(a.held) == ["c"] and b.held == {}  # one survivor drains c (the drain lease)
    assert [link.client_id for link in links] == ["c", "c"] and all(link.started for link in links)
    assert leases.rows[DRAIN_LEASE + "c"][0] == "a:1"

    clock[0] = 107.0
    c.renew()  # c is back (same client id: its lease is renewed at once)
    a.step()
    assert a.held == {} and all(link.stopped for link in links)
    assert DRAIN_LEASE + "c" not in leases.rows


def test_a_session_taken_back_is_not_retaken_at_once() -> None:
    leases, clock = Leases(), [100.0]
    links: list[Link] = []
    a, b = _server(leases, "a", clock, links), _server(leases, "b", clock, links)
    a.renew()
    b.renew()
    clock[0] = 106.0
    a.renew()
    a.step()
    assert list(a.held) == ["b"]
    a.step()  # connected: seen up
    for link in links:
        link.connected.clear()  # the broker gave the session to its owner (b reconnected)
    a.step()
    assert a.held == {}
    clock[0] = 107.0
    a.renew()
    a.step()  # b's lease still looks expired, but its session was just handed back
    assert a.held == {}
    clock[0] = 112.0
    a.renew()
    a.step()  # b never renewed: it is dead after all
    assert list(a.held) == ["b"]


def test_a_clean_stop_gives_the_session_to_a_peer() -> None:
    leases, clock = Leases(), [100.0]
    links: list[Link] = []
    a, b = _server(leases, "a", clock, links), _server(leases, "b", clock, links)
    a.renew()
    b.renew()
    b.stop()
    assert leases.rows[SESSION_LEASE + "b"][1] < clock[0]  # ended at once, not left to expire
    a.step()
    assert list(a.held) == ["b"]  # what the broker queues for b's session from now on reaches a


def test_a_peer_without_a_login_is_not_taken() -> None:
    """On a broker binding client id to login, a session is resumed only with that login: a peer missing from
    ``[broker] peer_logins`` is left alone (connecting with our own login would take over our own session)."""
    leases, clock = Leases(), [100.0]
    links: list[Link] = []

    def connect(peer: str) -> list[Link]:
        links.append(Link(peer))
        return links[-1:]

    a = SessionTakeover(leases, owner="a:1", client_id="a", ttl_s=5.0, clock=lambda: clock[0], connect=connect,
                        may_take=lambda p: p == "c")
    a.renew()
    for peer in ("b", "c"):
        leases.acquire_lease(SESSION_LEASE + peer, peer, 5.0, now=100.0)
    clock[0] = 106.0
    a.renew()
    a.step()
    a.step()
    assert list(a.held) == ["c"] and [link.client_id for link in links] == ["c"]
    assert DRAIN_LEASE + "b" not in leases.rows  # nor does it keep another survivor from b
