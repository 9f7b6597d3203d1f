"""Attacks on the control plane's HTTP API, against a real ``edgefleet server run`` process on loopback.

Bad framing (negative, non-numeric, duplicated Content-Length; a body on a GET; Content-Length with
Transfer-Encoding) is a 400 without reading; an oversized body is a 413 without buffering it;
half-sent requests are cut off at the head deadline with no thread each and no log flood; a token
gets only what its role covers; an edited or deleted audit row is found by ``audit verify``; a
flood of anonymous calls is counted, not written row by row.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from server.access import ROLES, allows, row_hash
from server.api import ROUTES
from server.broker import MosquittoBroker
from server.config import load_config
from server.registry.db import open_database
from tests.support.faults import FaultLedger
from tests.support.rawhttp import exchange, request, response
from tests.support.servers.process import ServerProcess, edgefleet

pytestmark = pytest.mark.broker

MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 16
HEADER_TIMEOUT_S = 2.0
SETTINGS = {"api": {"max_body_bytes": MAX_BODY, "max_connections": MAX_CONNECTIONS,
                    "header_timeout_s": HEADER_TIMEOUT_S, "idle_timeout_s": 5.0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path_factory.mktemp("cp") / "home", broker, [], settings=SETTINGS)
    s.start()
    yield s
    s.stop()


def _port(server: ServerProcess) -> int:
    return int(server.api_url.rsplit(":", 1)[1])


def raw(server: ServerProcess, data: bytes, *, timeout: float = 15.0) -> tuple[int | None, bytes]:
    return exchange(_port(server), data, timeout=timeout)


def _rss(server: ServerProcess) -> int:
    assert server.proc is not None
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    status, body = raw(server, request("GET", "/metrics"))
    assert status == 200
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in body.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_content_length_attacks_are_refused_unread(server: ServerProcess, ledger: FaultLedger) -> None:
    bad = {
        "negative": {"Content-Length": "-1"},
        "non_numeric": {"Content-Length": "12abc"},
        "duplicated": {"Content-Length": "5\r\nContent-Length: 5"},
        "with_transfer_encoding": {"Content-Length": "5", "Transfer-Encoding": "chunked"},
    }
    for path, method in (("/healthz", "GET"), ("/v1/devices", "POST")):
        for case, headers in bad.items():
            status, _ = raw(server, request(method, path, headers, b"hello"))
            ledger.trial(status == 400)
            assert status == 400, (case, path, status)
    status, body = raw(server, request("GET", "/healthz", {"Content-Length": "5"}, b"hello"))
    ledger.trial(status == 400)
    assert status == 400 and b"take no body" in body, (status, body)
    # the reviewer's attack: a negative length, then stream a lot; the server must cut us off, not read it
    before = _rss(server)
    cut_off, sent = False, 0
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=15) as sock:
        sock.sendall(request("GET", "/healthz", {"Content-Length": "-1"}))
        try:
            while sent < 64 << 20:
                sock.sendall(b"\0" * (1 << 20))
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            cut_off = True
    grown = _rss(server) - before
    ledger.note(f"negative Content-Length then a stream: cut off after {sent >> 20} MiB, RSS +{grown >> 20} MiB")
    ledger.trial(cut_off and grown < 16 << 20)
    assert cut_off, f"the server read {sent >> 20} MiB after a negative Content-Length"
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB"
    assert raw(server, request("GET", "/healthz"))[0] == 200


def test_oversized_body_is_refused_before_it_is_read(server: ServerProcess, ledger: FaultLedger) -> None:
    auth = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    # declared too large: answered from the headers alone (no body is ever sent)
    status, body = raw(server, request("POST", "/v1/devices", {**auth, "Content-Length": str(MAX_BODY + 1)}))
    ledger.trial(status == 413)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large", (status, body)
    # chunked without a length: cut off at the cap, whatever follows
    before = _rss(server)
    cut_off, sent, status = False, 0, None
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=15) as sock:
        sock.sendall(request("POST", "/v1/devices", {**auth, "Transfer-Encoding": "chunked"}))
        try:
            while sent < 32 << 20:
                sock.sendall(b"100000\r\n" + b"\0" * (1 << 20) + b"\r\n")
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            cut_off = True
        if not cut_off:
            status = response(sock)[0]
    grown = _rss(server) - before
    ledger.note(f"chunked body over the cap: cut off after {sent >> 20} MiB, RSS +{grown >> 20} MiB")
    ledger.trial((cut_off or status == 413) and grown < 16 << 20)
    assert cut_off or status == 413, status
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB"
    # without a token nothing is read either: 401 straight from the headers
    status, _ = raw(server, request("POST", "/v1/devices", {"Content-Length": str(MAX_BODY - 1)}))
    ledger.trial(status == 401)
    assert status == 401


def test_half_sent_requests_are_cut_off_quietly(server: ServerProcess, ledger: FaultLedger) -> None:
    log_before = server.log_text().count("\n")
    socks: list[socket.socket] = []
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", _port(server)), timeout=15)
        s.sendall(f"GET /healthz?n={i} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
        socks.append(s)
    assert server.proc is not None
    threads = psutil.Process(server.proc.pid).num_threads()
    ledger.note(f"150 half-sent requests: server threads {threads}")
    for s in socks[:20]:  # some clients give up first: the server must not log their going away either
        s.close()
    started = time.monotonic()
    deadline = started + HEADER_TIMEOUT_S + 30.0
    open_ = set(socks[20:])
    while open_ and time.monotonic() < deadline:  # wait for the server to close every one
        readable, _, _ = select.select(list(open_), [], [], 1.0)
        for s in readable:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data or b"408" in data:
                open_.discard(s)
    for s in socks:
        s.close()
    ledger.note(f"all cut off {time.monotonic() - started:.1f} s after (head deadline {HEADER_TIMEOUT_S:.0f} s)")
    ledger.trial(not open_ and threads < 60)
    assert not open_, f"{len(open_)} half-sent connections still held open"
    assert threads < 60, f"{threads} threads for 150 connections"
    assert raw(server, request("GET", "/healthz"))[0] == 200
    added = server.log_text().splitlines()[log_before:]
    ledger.trial(len(added) < 10 and not any("Traceback" in line for line in added))
    assert not any("Traceback" in line for line in added), "\n".join(added[:40])
    assert len(added) < 10, "\n".join(added[:40])
    cut = _metric(server, "edgefleet_api_rejected_total", reason="header_timeout") + _metric(
        server, "edgefleet_api_rejected_total", reason="connection_cap")
    assert cut >= 130, cut


def _probe(route_path: str) -> str:
    values = {"device_id": "probe-dev", "group": "probe-g", "deployment_id": "d-probe", "batch_id": "b-probe",
              "model": "probe", "version": "1", "name": "probe-token"}
    for k, v in values.items():
        route_path = route_path.replace("{" + k + "}", v)
    return route_path


def _call(server: ServerProcess, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    data = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Length": str(len(data))} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, payload = raw(server, request(method, path, headers, data))
    assert status is not None
    return status, json.loads(payload) if payload.startswith((b"{", b"[")) else payload


def test_each_role_is_refused_what_it_lacks(server: ServerProcess, ledger: FaultLedger) -> None:
    tokens = {}
    for role in ROLES:
        out = edgefleet(server.home, "tokens", "create", f"probe-{role}", "--role", role)
        tokens[role] = out.stdout.strip().splitlines()[-1]
    for route in ROUTES:
        # a body no schema accepts: an allowed call fails validation and changes nothing
        body = {"__probe__": 1} if route.method == "POST" else None
        path = _probe(route.path)
        if route.role == "public":
            continue
        status, _ = _call(server, route.method, path, None, body)
        ledger.trial(status == 401)
        assert status == 401, (route.name, status)
        for role, token in tokens.items():
            status, payload = _call(server, route.method, path, token, body)
            allowed = allows(role, route.role)
            ok = (status not in (401, 403)) if allowed else (status == 403 and payload["error"]["code"] == "forbidden")
            ledger.trial(ok)
            assert ok, (route.name, role, status, payload)
    # a deploy token cannot read back a device's MQTT password, nor approve a key
    assert _call(server, "POST", "/v1/devices/probe-dev/broker-password", tokens["deploy"])[0] == 403
    # and even admin cannot approve a key without its fingerprint
    status, payload = _call(server, "POST", "/v1/devices/probe-dev/approve", tokens["admin"], {"profile": "rpi4"})
    ledger.trial(status == 400 and "fingerprint" in payload["error"]["message"])
    assert status == 400 and "fingerprint" in payload["error"]["message"], payload
    edgefleet(server.home, "tokens", "revoke", "probe-admin")
    assert _call(server, "GET", "/v1/status", tokens["admin"])[0] == 401


def _audit(server: ServerProcess, **query: Any) -> list[dict[str, Any]]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, rows = _call(server, "GET", f"/v1/audit?{q}", server.token)
    assert status == 200
    assert isinstance(rows, list)
    return rows


def test_anonymous_flood_is_counted_not_written(server: ServerProcess, ledger: FaultLedger) -> None:
    before = _audit(server, limit=1)
    mark = before[-1]["id"] if before else 0
    refused = _metric(server, "edgefleet_api_refused_total", reason="unauthorized")
    body = json.dumps({"device_id": "flood", "profile": "rpi4"}).encode()
    for _ in range(500):
        status, _ = raw(server, request("POST", "/v1/devices", {"Content-Length": str(len(body))}, body))
        assert status == 401
    rows = [r for r in _audit(server, limit=1000) if r["id"] > mark and r["actor"] == "anonymous"]
    counted = _metric(server, "edgefleet_api_refused_total", reason="unauthorized") - refused
    ledger.note(f"500 anonymous calls: {len(rows)} audit rows, {counted:.0f} counted")
    ledger.trial(len(rows) <= 2 and counted >= 500)
    assert len(rows) <= 2, rows[:5]
    # the first refused call of a window is on record (here or from an earlier test's refusals)
    assert any(r["outcome"] == "error:unauthorized" for r in _audit(server, actor="anonymous"))
    assert counted >= 500


def _verify(server: ServerProcess, *extra: str) -> tuple[int, str]:
    out = server.cli("audit", "verify", *extra, check=False)
    return out.returncode, out.stdout + out.stderr


def test_audit_tampering_is_detected(server: ServerProcess, ledger: FaultLedger) -> None:
    for i in range(3):
        assert _call(server, "POST", "/v1/devices", server.token,
                     {"device_id": f"audit-{i}", "profile": "rpi4", "broker_password": False})[0] == 200
    code, text = _verify(server)
    ledger.trial(code == 0)
    assert code == 0 and "intact" in text, text
    report = json.loads(_verify(server, "--json")[1])
    anchor = f"{report['head_id']}:{report['head_hash']}"
    db = server.home / "registry.db"
    rows = _audit(server, limit=3)
    edited, deleted = rows[0]["id"], rows[1]["id"]

    _sql(db, "UPDATE audit SET actor = 'someone-else' WHERE id = ?", edited)  # an edit: its own hash breaks
    code, text = _verify(server)
    ledger.trial(code == 1 and f"#{edited}" in text)
    assert code == 1 and f"#{edited}" in text and "edited" in text, text

    _sql(db, "UPDATE audit SET actor = ? WHERE id = ?", rows[0]["actor"], edited)  # put back: intact again
    assert _verify(server)[0] == 0
    _sql(db, "DELETE FROM audit WHERE id = ?", deleted)  # a deletion: a gap and a broken link
    code, text = _verify(server)
    ledger.trial(code == 1 and f"#{deleted + 1}" in text)
    assert code == 1 and "missing" in text, text

    _rechain(db)  # a careful forger recomputes every hash: only a saved anchor catches it
    assert _verify(server)[0] == 0
    code, text = _verify(server, "--anchor", anchor)
    ledger.trial(code == 1)
    assert code == 1 and ("rewritten" in text or "truncated" in text), text


def _database(db: Path) -> Any:
    """The server's registry as the forger reaches it (SQLite file or, in the PostgreSQL pass, its database)."""
    return open_database(load_config(db.parent).registry_url, db)


def _sql(db: Path, statement: str, *args: Any) -> None:
    database = _database(db)
    try:
        with database.transaction() as conn:
            conn.execute(statement, args)
    finally:
        database.close()


def _rechain(db: Path) -> None:
    database = _database(db)
    with contextlib.closing(database), database.transaction() as conn:
        prev, expected = "", None
        for r in conn.execute("SELECT * FROM audit ORDER BY id").fetchall():
            rid = r["id"] if expected is None else expected
            if rid != r["id"]:
                conn.execute("UPDATE audit SET id = ? WHERE id = ?", (rid, r["id"]))
            row = {**dict(r), "id": rid}
            digest = row_hash(row, prev)
            conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, rid))
            prev, expected = digest, rid + 1
