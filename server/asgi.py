"""The API's HTTP transport: the route table (``server.api``) as a Starlette app on uvicorn.

Parsing is llhttp's (uvicorn's ``httptools`` protocol): a negative, non-numeric or duplicated
``Content-Length``, or one next to ``Transfer-Encoding``, is a 400 before the app sees anything.
On top of it this module adds what uvicorn leaves to the operator:

* a head deadline: the request line and headers must arrive within ``[api] header_timeout_s`` of
  the connection opening (or of the request's first byte on a kept-alive connection, which is
  otherwise closed after ``idle_timeout_s``), and the head may not exceed
  ``max_header_bytes`` (431); the body must arrive within ``body_timeout_s``. A slow or half-sent
  request is closed, counted, and not logged line by line;
* a connection cap: past ``max_connections`` a request is answered 503 (uvicorn's
  ``limit_concurrency``), past twice that a new connection is closed at once;
* the body cap before reading: a body on a GET, or a body on a route that takes none, is a 400
  without reading it; a declared ``Content-Length`` over ``max_body_bytes`` is a 413 without
  reading it, and a chunked body is cut off at the cap; bodies are read only after the token
  was accepted;
* refused calls counted (``edgefleet_api_refused_total``) and their audit rows aggregated per
  actor and window (``RefusalAudit``), so a flood of anonymous calls cannot grow the audit log;
* optional HTTPS (``[api] tls_cert``/``tls_key``).

Handlers are synchronous (SQLite): they run in worker threads, at most ``max_connections`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.routing import Route as StarRoute
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api import Api, Route, status_for
from server.config import ApiSection
from server.errors import AuthError, ConfigError, InvalidRequestError, PayloadTooLargeError, ServerError
from server.metrics import Family

log = logging.getLogger("edgefleet.api")

#: a POST route without a body schema still accepts ``{}`` (what some clients send); nothing bigger
_EMPTY_BODY_CAP = 64


#: the limits are the ``[api]`` section of the server config (``server.config.ApiSection``)
Limits = ApiSection


# -- counters ---------------------------------------------------------------------------------------------


class ApiStats:
    """This process's API counters (Prometheus families via ``families()``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refused: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.open_connections = 0

    def refuse(self, code: str) -> None:
        with self.lock:
            self.refused[code] += 1

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def families(self) -> list[Family]:
        with self.lock:
            refused = Family("edgefleet_api_refused_total", "counter",
                             "API calls refused for their token (unauthorized: none or unknown; forbidden: role)")
            for code in ("unauthorized", "forbidden"):
                refused.add(self.refused[code], reason=code)
            rejected = Family("edgefleet_api_rejected_total", "counter",
                              "HTTP requests or connections cut off by the transport's limits, by reason")
            for reason, n in sorted(self.rejected.items()):
                rejected.add(n, reason=reason)
            conns = Family("edgefleet_api_connections", "gauge", "Open API connections").add(self.open_connections)
        return [refused, rejected, conns]


class RefusalAudit:
    """Audit rows for refused calls, at most a few per actor and window.

    The first refused mutating call of an actor writes its own row and opens a window of
    ``window_s``; the calls refused during the window are only counted, and when it ends one
    ``refused_calls`` row records how many (per route) and a new window opens if there were any.
    A sustained flood therefore writes one row a minute, whatever its rate."""

    def __init__(self, api: Api, *, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, Counter[str], str]] = {}

    def refused(self, route: Route, exc: AuthError) -> None:
        actor = exc.actor
        if not route.mutating:
            return
        now = self.clock()
        self.flush(now)
        with self._lock:
            window = self._windows.get(actor)
            if window is not None:
                window[1][route.name] += 1
                return
            self._windows[actor] = (now, Counter(), exc.code)
        self.api.audit_refused(route.name, actor, exc.code, exc.message)

    def flush(self, now: float | None = None, *, force: bool = False) -> None:
        now = self.clock() if now is None else now
        due: list[tuple[str, Counter[str], str]] = []
        with self._lock:
            for actor, (opened, counts, code) in list(self._windows.items()):
                if not force and now - opened < self.window_s:
                    continue
                if counts:
                    due.append((actor, counts, code))
                    self._windows[actor] = (now, Counter(), code)
                else:
                    del self._windows[actor]
        for actor, counts, code in due:
            n = sum(counts.values())
            self.api.audit_refused("refused_calls", actor, code,
                                   f"{n} more refused calls by {actor} within {self.window_s:.0f} s (aggregated; "
                                   "every one is counted in edgefleet_api_refused_total)",
                                   params={"count": n, "routes": dict(counts)})


class _QuietLog(logging.Filter):
    """Lets each distinct uvicorn message through once a minute and says how many were held back."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # a traceback from uvicorn is a bug worth seeing, but once a minute is enough
        key = f"exc:{record.getMessage()}" if record.exc_info else record.getMessage()
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (0.0, 0))
            if now - last < self.every_s:
                self._last[key] = (last, held + 1)
                return False
            self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last {self.every_s:.0f} s)"
            record.args = ()
        return True


# -- the protocol: uvicorn's httptools protocol with deadlines and a head cap ------------------------------

_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 25\r\n"
        b"connection: close\r\n\r\nrequest head is too large")
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 31\r\n"
        b"connection: close\r\n\r\nthe request head came too slowly")


def guarded_protocol(limits: Limits, stats: ApiStats) -> type[HttpToolsProtocol]:
    class GuardedProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _head_done = False
        _head_bytes = 0
        _head_too_large = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            with stats.lock:
                stats.open_connections += 1
            if len(self.connections) > 2 * limits.max_connections:
                stats.reject("connection_cap")
                transport.abort()
                return
            self._arm(limits.header_timeout_s, "header_timeout")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            with stats.lock:
                stats.open_connections -= 1
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting_head = not self._head_done
            super().data_received(data)
            if waiting_head and not self._head_done and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._refuse_head()

        def send_400_response(self, msg: str) -> None:
            if self._head_too_large:
                self._refuse_head()
                return
            stats.reject("bad_request")
            super().send_400_response(msg)

        def _refuse_head(self) -> None:
            stats.reject("head_too_large")
            self.transport.write(_431)
            self.transport.close()

        def on_message_begin(self) -> None:  # the first byte of a request: its head deadline starts
            super().on_message_begin()
            self._head_done, self._head_bytes = False, 0
            if self._deadline is None:
                self._arm(limits.header_timeout_s, "header_timeout")

        def on_headers_complete(self) -> None:
            self._head_done = True
            size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if size > limits.max_header_bytes:  # a whole head in one read: refused here, before the app
                self._head_too_large = True
                raise ValueError("request head too large")  # stops the parser; send_400_response answers 431
            super().on_headers_complete()
            if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
                stats.reject("over_capacity")
            self._arm(limits.body_timeout_s, "body_timeout")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def on_response_complete(self) -> None:  # idle until the next request: uvicorn's keep-alive timeout
            super().on_response_complete()
            self._head_done, self._head_bytes = False, 0

        def _arm(self, seconds: float, reason: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire, reason)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self, reason: str) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            stats.reject(reason)
            if reason == "header_timeout" and self._head_bytes:
                self.transport.write(_408)
            self.transport.close()

    return GuardedProtocol


# -- the app ----------------------------------------------------------------------------------------------


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, default=str).encode()


def error_response(status: int, code: str, message: str, *, close: bool = False) -> Response:
    headers = {"Connection": "close"} if close else None
    return Response(_json_bytes({"error": {"code": code, "message": message}}), status_code=status,
                    media_type="application/json", headers=headers)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() or None if auth.lower().startswith("bearer ") else None


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():  # llhttp refuses these already; kept for other servers in front
        raise InvalidRequestError("Content-Length must be a non-negative integer")
    return int(raw)


def _check_framing(request: Request, route: Route, limits: Limits) -> None:
    """Refuse a body this route cannot take, or one over the cap, before reading a byte of it."""
    length = _declared_length(request)
    chunked = "transfer-encoding" in request.headers
    has_body = chunked or bool(length)
    if not has_body:
        return
    if request.method in ("GET", "HEAD", "DELETE"):
        raise InvalidRequestError(f"{request.method} requests take no body")
    cap = limits.max_body_bytes if route.body is not None else _EMPTY_BODY_CAP
    if length is not None and length > cap:
        if route.body is None:
            raise InvalidRequestError(f"{route.method} {route.path} takes no body")
        raise PayloadTooLargeError(f"request body of {length} bytes is over the limit of {cap} bytes")


async def _read_body(request: Request, route: Route, limits: Limits) -> Any:
    cap = limits.max_body_bytes if route.body is not None else _EMPTY_BODY_CAP
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLargeError(f"request body is over the limit of {cap} bytes")
    if not buf:
        return None
    try:
        return json.loads(bytes(buf))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not JSON: {exc}") from exc


class _Endpoint:
    def __init__(self, transport: ApiTransport, route: Route) -> None:
        self.t, self.route = transport, route

    async def handle(self, request: Request) -> Response:
        t, route = self.t, self.route
        body_read = False
        try:
            _check_framing(request, route, t.limits)
            actor = await t.in_worker(self._authenticate, _bearer(request))
            body = await _read_body(request, route, t.limits)
            body_read = True
            result = await t.in_worker(partial(t.api.invoke, route, actor=actor, path=dict(request.path_params),
                                               query=dict(request.query_params), body=body))
        except ServerError as exc:
            status = status_for(exc)
            if isinstance(exc, InvalidRequestError) and status in (400, 413) and not body_read:
                t.stats.reject("too_large" if status == 413 else "bad_body")
            return error_response(status, exc.code, exc.message, close=not body_read)
        except ClientDisconnect:
            t.stats.reject("client_disconnect")
            return Response(status_code=400)  # nobody is listening any more
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "internal", f"internal error: {type(exc).__name__}")
        if route.content_type.startswith("application/json"):
            return Response(_json_bytes(result), media_type=route.content_type)
        return Response(str(result).encode(), media_type=route.content_type)

    def _authenticate(self, token: str | None) -> str:
        try:
            return self.t.api.authenticate(self.route, token)
        except AuthError as exc:
            self.t.stats.refuse(exc.code)
            self.t.refusals.refused(self.route, exc)
            raise


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
    if exc.status_code == 404:
        return error_response(404, "not_found", f"no such endpoint: {request.method} {request.url.path}")
    return error_response(exc.status_code, "http", str(exc.detail))


class ApiTransport:
    """The Starlette app for an ``Api`` plus what its requests share (limits, counters, workers)."""

    def __init__(self, api: Api, limits: Limits, stats: ApiStats, refusals: RefusalAudit, *,
                 secure: bool = False, console: bool = True) -> None:
        self.api, self.limits, self.stats, self.refusals = api, limits, stats, refusals
        self._limiter: anyio.CapacityLimiter | None = None
        routes: list[BaseRoute] = [StarRoute(r.path, _Endpoint(self, r).handle, methods=[r.method], name=r.name)
                                   for r in api.routes]
        self.console = None
        if console:
            from server.console.web import Console  # noqa: PLC0415 - jinja2 loads with the server only

            self.console = Console(api, in_worker=self.in_worker, secure=secure, on_refused=self._console_refused,
                                   max_streams=max(1, limits.max_connections // 4))
            routes += self.console.routes()
        self.app = Starlette(routes=routes, exception_handlers={404: _http_error, 405: _http_error})

    def _console_refused(self, route: Route, exc: AuthError) -> None:
        self.stats.refuse(exc.code)
        self.refusals.refused(route, exc)

    async def in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.limits.max_connections)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


# -- the server -------------------------------------------------------------------------------------------


class ApiHttpServer:
    """uvicorn in a thread on a socket bound at construction (port 0 picks a free one)."""

    def __init__(self, address: tuple[str, int], api: Api, *, limits: Limits | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.api = api
        self.limits = limits or Limits()
        self.stats = ApiStats()
        self.refusals = RefusalAudit(api)
        self.tls = tls is not None
        transport = ApiTransport(api, self.limits, self.stats, self.refusals, secure=tls is not None)
        self.console = transport.console
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(address)
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.set_inheritable(True)
        config = uvicorn.Config(
            transport.app, http=guarded_protocol(self.limits, self.stats), lifespan="off", log_config=None,
            access_log=False, server_header=False, proxy_headers=False, limit_concurrency=self.limits.max_connections,
            timeout_keep_alive=max(1, round(self.limits.idle_timeout_s)), timeout_graceful_shutdown=3,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            self.sock.close()
            raise ConfigError(f"[api] tls_cert/tls_key: cannot load: {exc}", field="api.tls_cert") from exc
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        for name in ("uvicorn.error", "uvicorn"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _QuietLog) for f in logger.filters):
                logger.addFilter(_QuietLog())

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="edgefleet-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise ServerError("the API server did not start (see the log)")

    def flush_audit(self) -> None:
        self.refusals.flush()

    def stop(self) -> None:
        if self.console is not None:
            self.console.closing.set()  # live-update streams end at their next poll
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.refusals.flush(force=True)
        with contextlib.suppress(OSError):
            self.sock.close()
