"""The API's HTTP transport (server.asgi) on loopback: HTTPS, error shapes, the head cap, quiet disconnects."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api import Api
from server.artifacts import ArtifactStore
from server.asgi import ApiHttpServer
from server.broker import generate_tls
from server.builds import StaticBuilds
from server.client import HttpClient
from server.config import ApiSection, ServerConfig
from server.errors import ConfigError, ForbiddenError, ServerError
from server.keys import token_digest
from server.registry.db import Database
from server.registry.fleet import FleetRegistry
from server.service import FleetService
from tests.support.rawhttp import exchange, request, response

LIMITS = ApiSection(max_body_bytes=4096, max_header_bytes=8192, header_timeout_s=5.0)


@pytest.fixture
def api(tmp_path: Path) -> Api:
    registry = FleetRegistry(Database(tmp_path / "registry.db"))
    registry.migrate()
    registry.add_token("viewer", token_digest("read-token"), role="read")
    config = ServerConfig(home=tmp_path)
    return Api(FleetService(config, registry, builds=StaticBuilds(),
                            artifacts=ArtifactStore(config.paths.artifacts_dir, registry)))


@pytest.fixture
def http(api: Api) -> Iterator[ApiHttpServer]:
    server = ApiHttpServer(("127.0.0.1", 0), api, limits=LIMITS)
    server.start()
    yield server
    server.stop()


def _raw(port: int, data: bytes) -> bytes:
    status, body = exchange(port, data, timeout=10)
    return f"HTTP/1.1 {status} ".encode() + b"\r\n\r\n" + body


def test_https_with_a_private_ca(tmp_path: Path, api: Api) -> None:
    tls = generate_tls(tmp_path / "tls", hosts=("127.0.0.1",))
    server = ApiHttpServer(("127.0.0.1", 0), api, limits=LIMITS, tls=(tls.server_cert, tls.server_key))
    server.start()
    try:
        url = f"https://127.0.0.1:{server.port}"
        client = HttpClient(url, "read-token", ca_cert=tls.ca_cert)
        assert client.call("health")["ok"] is True
        assert client.call("status")["devices"] == 0
        with pytest.raises(ForbiddenError, match="needs admin"):
            client.call("revoke_device", path={"device_id": "x"})
        with pytest.raises(ServerError, match="cannot reach"):  # the system trust store does not know this CA
            HttpClient(url, "read-token").call("health")
        with pytest.raises(ServerError, match="cannot reach"):  # nor does plain HTTP get anything
            HttpClient(f"http://127.0.0.1:{server.port}", "read-token", timeout=5).call("health")
    finally:
        server.stop()
    with pytest.raises(ConfigError, match="tls_cert"):
        ApiHttpServer(("127.0.0.1", 0), api, limits=LIMITS, tls=(tmp_path / "none.crt", tmp_path / "none.key"))


def test_error_shapes_and_the_head_cap(http: ApiHttpServer) -> None:
    out = _raw(http.port, b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404") and json.loads(out.partition(b"\r\n\r\n")[2])["error"]["code"] == "not_found"
    out = _raw(http.port, b"DELETE /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and b"method_not_allowed" in out
    out = _raw(http.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out[:80]
    assert http.stats.rejected["head_too_large"] == 1
    out = _raw(http.port, b"POST /v1/devices/x/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer read-token\r\n"
                          b"Content-Length: 2\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 403") and b"forbidden" in out
    assert http.stats.refused["forbidden"] == 1


def test_a_client_that_goes_away_mid_body_is_counted_quietly(http: ApiHttpServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    http.api.service.registry.add_token("ops", token_digest("admin-token"), role="admin")
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as s:
            s.sendall(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-token\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"device_id\"")
    deadline = time.monotonic() + 30
    while http.stats.rejected["client_disconnect"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.stats.rejected["client_disconnect"] == 20
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert http.api.service.registry.list_devices() == []


def test_a_kept_alive_connection_gets_a_head_deadline_for_each_request(api: Api) -> None:
    server = ApiHttpServer(("127.0.0.1", 0), api, limits=ApiSection(header_timeout_s=1.0, idle_timeout_s=60.0))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
            s.sendall(request("GET", "/healthz"))
            assert response(s)[0] == 200
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the next request stalls mid-head
            status, body = response(s)  # the server answers 408 and closes (the socket timeout is only a bound)
            assert status == 408 and b"too slowly" in body
            assert s.recv(1) == b""
        assert server.stats.rejected["header_timeout"] == 1
    finally:
        server.stop()


def test_past_the_connection_cap_requests_get_503_and_past_twice_it_connections_are_closed(api: Api) -> None:
    server = ApiHttpServer(("127.0.0.1", 0), api, limits=ApiSection(max_connections=2))
    server.start()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(2)]
    try:
        deadline = time.monotonic() + 15
        while server.stats.open_connections < 2 and time.monotonic() < deadline:  # the server has accepted them
            time.sleep(0.02)
        assert exchange(server.port, request("GET", "/healthz"))[0] == 503
        more = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(3)]
        # the 5th open connection is over twice the cap: closed at once, before any request
        with contextlib.suppress(ConnectionResetError):
            assert more[-1].recv(1) == b""
        assert server.stats.rejected["connection_cap"] >= 1
        for s in more:
            s.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 15
    while server.stats.open_connections > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exchange(server.port, request("GET", "/healthz"))[0] == 200
    assert server.stats.rejected["over_capacity"] == 1
    server.stop()
