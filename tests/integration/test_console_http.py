"""The console's HTTP rules without a browser: sessions, CSRF, roles, escaping, headers, live stream.

An in-process FleetServer on a private mosquitto with stand-in devices (``tests.support.device``);
requests are plain HTTP, as an attacker's would be.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.broker import MosquittoBroker
from server.keys import token_digest
from tests.support.servers.fleet import Fleet, onnx_builds

pytestmark = pytest.mark.broker

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Client:
    """A cookie-keeping HTTP client that does not follow redirects."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        for k, v in resp.getheaders():
            if k.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                value = rest.split(";")[0].strip('"')
                if "max-age=0" in v.lower() or "expires=thu, 01 jan 1970" in v.lower():
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
        headers_out = {k.lower(): v for k, v in resp.getheaders() if k.lower() != "set-cookie"}
        headers_out["set-cookie"] = "\n".join(v for k, v in resp.getheaders() if k.lower() == "set-cookie")
        conn.close()
        return resp.status, headers_out, text

    def login(self, token: str, next_: str = "/ui/") -> tuple[int, dict[str, str], str]:
        _, _, page = self.request("GET", "/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        return self.request("POST", "/ui/login", form={"nonce": nonce.group(1), "token": token, "next": next_})

    def csrf(self, path: str = "/ui/") -> str:
        _, _, page = self.request("GET", path)
        m = re.search(r'name="csrf" content="([^"]+)"', page)
        assert m is not None, page[:500]
        return m.group(1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("console-http")
    with MosquittoBroker(workdir=tmp / "mosquitto") as broker:
        f = Fleet(tmp, broker, onnx_builds(tmp / "builds", "m", [1], ["rpi4"]))
        try:
            dev = f.device("con-0")
            f.wait_online(dev)
            dev.event("lifecycle.note", severity="warning", message=XSS)
            dev.send_telemetry(p95=3.0, cpu=10.0)
            deadline = time.monotonic() + 60
            while not any(e.message == XSS for e in f.server.registry.list_events(device_id="con-0")):
                assert time.monotonic() < deadline, "the device's event was not ingested"
                time.sleep(0.05)
            yield f
        finally:
            f.close()


def tokens(fleet: Fleet, role: str) -> str:
    return fleet.token(f"{role}-{uuid.uuid4().hex[:6]}", role)


def client(fleet: Fleet) -> Client:
    return Client(fleet.server.http.port)


def test_pages_need_a_session_and_login_sets_a_strict_http_only_cookie(fleet: Fleet) -> None:
    c = client(fleet)
    status, headers, _ = c.request("GET", "/ui/devices?state=online")
    assert status == 303 and headers["location"] == "/ui/login?next=%2Fui%2Fdevices%3Fstate%3Donline"
    status, headers, _ = c.login("eft_wrong")
    assert status == 401 and "ef_session" not in c.cookies
    status, headers, _ = c.login(tokens(fleet, "read"), next_="//evil.example/x")
    assert status == 303 and headers["location"] == "/ui/", "never an open redirect"
    cookie = next(line for line in headers["set-cookie"].splitlines() if line.startswith("ef_session="))
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/ui" in cookie.lower()
    assert "secure" not in cookie.lower(), "plain HTTP: no Secure flag (it would drop the cookie)"
    status, headers, page = c.request("GET", "/ui/devices")
    assert status == 200 and "con-0" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert "<script>" not in re.sub(r'<script src="/ui/static/console.js" defer></script>', "", page)


def test_a_login_form_without_its_nonce_is_refused(fleet: Fleet) -> None:
    c = client(fleet)
    status, _, page = c.request("POST", "/ui/login", form={"token": tokens(fleet, "admin"), "next": "/ui/"})
    assert status == 403 and "expired" in page and "ef_session" not in c.cookies


def test_device_supplied_text_is_escaped(fleet: Fleet) -> None:
    c = client(fleet)
    c.login(tokens(fleet, "read"))
    for path in ("/ui/", "/ui/devices/con-0"):
        _, _, page = c.request("GET", path)
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page, path
        assert XSS not in page and "<img src=x" not in page


def test_actions_need_the_session_csrf_token_a_same_origin_and_the_role(fleet: Fleet) -> None:
    c = client(fleet)
    c.login(tokens(fleet, "admin"))
    csrf = c.csrf()
    path = "/ui/devices/con-0/revoke"
    status, _, page = c.request("POST", path, form={"confirm": "yes"})
    assert status == 403 and "CSRF" in page
    status, _, page = c.request("POST", path, form={"confirm": "yes", "csrf": "x" + csrf})
    assert status == 403
    status, _, page = c.request("POST", path, form={"confirm": "yes", "csrf": csrf},
                                headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in page
    status, _, page = c.request("POST", path, body=b"x" * (17 * 1024),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "form over" in page
    status, _, _ = c.request("POST", path, body=b'{"csrf": "x"}', headers={"Content-Type": "application/json"})
    assert status == 400
    assert fleet.server.registry.get_device("con-0").status == "active", "nothing above revoked the device"

    reader = client(fleet)
    reader.login(tokens(fleet, "read"))
    status, _, page = reader.request("POST", path, form={"confirm": "yes", "csrf": reader.csrf()})
    assert status == 403 and "needs admin" in page
    refused = fleet.service.audit(action="revoke_device")
    assert refused and refused[-1]["outcome"] == "error:forbidden"
    assert fleet.server.registry.get_device("con-0").status == "active"


def test_revoking_the_token_ends_its_sessions(fleet: Fleet) -> None:
    c = client(fleet)
    token = tokens(fleet, "read")
    c.login(token)
    assert c.request("GET", "/ui/audit")[0] == 200
    name = fleet.server.registry.token_identity(token_digest(token))
    assert name is not None
    fleet.server.registry.revoke_token(name[0])
    status, headers, _ = c.request("GET", "/ui/audit")
    assert status == 303 and headers["location"].startswith("/ui/login")


def test_the_live_stream_sends_the_change_stamp(fleet: Fleet) -> None:
    c = client(fleet)
    c.login(tokens(fleet, "read"))
    conn = http.client.HTTPConnection("127.0.0.1", fleet.server.http.port, timeout=10)
    conn.request("GET", "/ui/live", headers={"Cookie": f"ef_session={c.cookies['ef_session']}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
    lines = [resp.readline().decode() for _ in range(4)]
    conn.close()
    assert lines[0] == "retry: 2000\n" and lines[2] == "event: change\n" and lines[3].startswith("data: ")
    assert client(fleet).request("GET", "/ui/live")[0] == 401


def test_live_streams_are_capped_so_api_calls_keep_their_connections(fleet: Fleet) -> None:
    console = fleet.server.http.console
    assert console is not None and console.max_streams == 16  # a quarter of [api] max_connections
    c = client(fleet)
    c.login(tokens(fleet, "read"))
    cookie = {"Cookie": f"ef_session={c.cookies['ef_session']}"}
    console.max_streams = 1
    try:
        conn = http.client.HTTPConnection("127.0.0.1", fleet.server.http.port, timeout=10)
        conn.request("GET", "/ui/live", headers=cookie)
        first = conn.getresponse()
        assert first.status == 200 and first.readline() == b"retry: 2000\n"
        status, _, _ = c.request("GET", "/ui/live")
        assert status == 204, "over the cap: no stream, and EventSource does not retry a 204"
        conn.close()
        deadline = time.monotonic() + 60
        while console._streams and time.monotonic() < deadline:  # the closed stream counts itself out
            time.sleep(0.05)
        assert console._streams == 0
    finally:
        console.max_streams = 16


def test_static_assets_ship_in_the_package(fleet: Fleet) -> None:
    import server.console

    root = Path(server.console.__file__).parent / "static"
    c = client(fleet)
    for name in ("console.css", "console.js"):
        status, _, body = c.request("GET", f"/ui/static/{name}")
        assert status == 200 and body == (root / name).read_text()
    assert "http://" not in (root / "console.css").read_text() and "https://" not in (root / "console.js").read_text()


def test_over_https_the_session_cookie_is_secure(tmp_path: Path) -> None:
    import ssl

    from server.api import Api
    from server.artifacts import ArtifactStore
    from server.asgi import ApiHttpServer
    from server.broker import generate_tls
    from server.builds import StaticBuilds
    from server.config import ServerConfig
    from server.registry.db import Database
    from server.registry.fleet import FleetRegistry
    from server.service import FleetService

    registry = FleetRegistry(Database(tmp_path / "registry.db"))
    registry.migrate()
    registry.add_token("viewer", token_digest("read-token"), role="read")
    config = ServerConfig(home=tmp_path)
    api = Api(FleetService(config, registry, builds=StaticBuilds(),
                           artifacts=ArtifactStore(config.paths.artifacts_dir, registry)))
    tls = generate_tls(tmp_path / "tls", hosts=("127.0.0.1",))
    server = ApiHttpServer(("127.0.0.1", 0), api, tls=(tls.server_cert, tls.server_key))
    server.start()
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_cert))

        def call(method: str, path: str, body: str | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], str]:
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=context)
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            out = resp.status, resp.getheaders(), resp.read().decode()
            conn.close()
            return out

        _, headers, page = call("GET", "/ui/login")
        nonce_cookie = next(v for k, v in headers if k.lower() == "set-cookie")
        assert "; secure" in nonce_cookie.lower()
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        status, headers, _ = call("POST", "/ui/login", urllib.parse.urlencode({"nonce": nonce.group(1),
                                                                               "token": "read-token"}),
                                  {"Content-Type": "application/x-www-form-urlencoded",
                                   "Cookie": nonce_cookie.split(";")[0]})
        session = next(v for k, v in headers if k.lower() == "set-cookie" and v.startswith("ef_session="))
        assert status == 303 and "; secure" in session.lower() and "samesite=strict" in session.lower()
        status, _, page = call("GET", "/ui/devices", headers={"Cookie": session.split(";")[0]})
        assert status == 200 and "0 of 0 devices" in page
    finally:
        server.stop()
