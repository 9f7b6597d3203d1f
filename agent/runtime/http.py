"""Local inference over HTTP: the Open Inference Protocol (KServe v2 REST) on 127.0.0.1, stdlib only.

Endpoints (``{model}`` is the served model's name; ``/versions/{v}`` may follow it to pin a version):

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 when a model is serving, else 503
    GET  /v2                             server metadata (name, version, extensions)
    GET  /v2/models/{model}              model metadata (platform, versions, inputs, outputs)
    GET  /v2/models/{model}/ready        200 when that model (version) is serving, 404 for another one
    GET  /v2/models/{model}/stats        requests, errors and latency percentiles of the served version
    POST /v2/models/{model}/infer        inference: JSON tensors, or JSON + binary tensor data

Errors are ``{"error": "..."}`` with 400 (malformed request, tensors that do not fit the model),
404 (unknown path or model), 405, 411 (no Content-Length), 413 (body over ``max_body_bytes``),
500 (the runtime failed), 503 (nothing serving yet; ``Retry-After: 1``).

One thread per connection (``ThreadingHTTPServer``), HTTP/1.1 keep-alive, at most ``max_connections``
open connections (the next gets 503 and is closed), idle connections closed after ``idle_timeout_s``.
Requests run on whatever model is active when they start; a hot swap never fails one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from agent import __version__
from agent.errors import (
    ConfigError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.oip import (
    HEADER_LENGTH,
    PLATFORMS,
    check_request_fits,
    encode_infer_response,
    parse_infer_request,
    server_metadata,
    tensor_metadata,
)

log = logging.getLogger(__name__)

JSON = "application/json"
_DISCARD_LIMIT = 64 * 1024 * 1024  # refused bodies up to this size are read and dropped; larger ones close


@dataclass(frozen=True)
class HttpConfig:
    """The local inference endpoint (agent config ``[http]``).

    host            address to bind; loopback by default: applications on the device only. An address
                    other than 127.0.0.1/::1/localhost needs ``allow_remote=True``.
    port            TCP port; 0 picks a free one (tests). Default 8080, KServe's.
    max_body_bytes  requests larger than this get 413 before their body is read. 1 KiB .. 1 GiB.
    max_connections open connections served at once (one thread each). 1..1024.
    idle_timeout_s  a keep-alive connection idle this long is closed; also bounds a slow upload. 0.1..3600.
    enabled         whether the agent serves it at all (``[http] enabled``; the server object ignores it).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 16 * 1024 * 1024
    max_connections: int = 64
    idle_timeout_s: float = 30.0
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be within 0..65535", field="port")
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ConfigError("max_body_bytes must be within 1 KiB..1 GiB", field="max_body_bytes")
        if not 1 <= self.max_connections <= 1024:
            raise ConfigError("max_connections must be within 1..1024", field="max_connections")
        if not 0.1 <= self.idle_timeout_s <= 3600:
            raise ConfigError("idle_timeout_s must be within 0.1..3600", field="idle_timeout_s")
        if self.enabled and self.host not in ("127.0.0.1", "::1", "localhost") and not self.allow_remote:
            raise ConfigError(
                f"refusing to serve inference on {self.host}: set allow_remote = true to expose it beyond this device",
                field="host",
            )


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


#: a refused connection's request is read (and dropped) for at most this long / this much before closing
_REFUSE_DRAIN_S = 0.5
_REFUSE_DRAIN_BYTES = 1 << 20


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], host: ModelHost, config: HttpConfig) -> None:
        self.model_host = host
        self.config = config
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            full = len(self.connections) >= self.config.max_connections
            if not full:
                self.connections.add(request)
        if full:
            threading.Thread(target=self._refuse, args=(request,), name="http-refuse", daemon=True).start()
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """503 to a connection over the limit; read what the client already sent before closing.

        Closing a socket with unread request bytes makes the kernel send a reset, and the client then
        often loses the 503 (it sees ``connection reset`` instead): so half-close, drain briefly, close.
        """
        body = b'{"error":"too many open connections"}'
        with contextlib.suppress(OSError):
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            request.shutdown(socket.SHUT_WR)
            request.settimeout(_REFUSE_DRAIN_S)
            drained = 0
            while drained < _REFUSE_DRAIN_BYTES and (chunk := request.recv(65536)):
                drained += len(chunk)
        with contextlib.suppress(OSError):
            request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s ended: %r", client_address, exc)  # clients hang up; that is normal
        else:
            log.error("error on connection from %s", client_address, exc_info=exc)

    def close_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().close_request(request)

    def drop_connections(self) -> None:
        with self.connections_lock:
            open_now = list(self.connections)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edgefleet-agent/{__version__}"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.config.idle_timeout_s)
        # responses go out as header + body writes: without NODELAY, Nagle and delayed ACKs stall keep-alive
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not supported")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the stdlib answers itself (bad request line, oversized headers, unknown method): JSON as well."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        self.request_version = self.protocol_version  # a garbled request line still gets a status line
        if status is HTTPStatus.NOT_IMPLEMENTED and self.command:
            status, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not supported"
        with contextlib.suppress(OSError):
            self._send_json(status, {"error": message or status.phrase})

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (curl asks for bodies over 1 MiB)."""
        raw = self.headers.get("Content-Length", "")
        if raw.isdigit() and int(raw) > self.server.config.max_body_bytes:
            self.close_connection = True
            self._send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body of {raw} bytes is over the {self.server.config.max_body_bytes}-byte limit"},
            )
            return False
        return super().handle_expect_100()

    # -- dispatch ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            self._route(method, body)
        except _HttpError as exc:
            self._send_json(exc.status, {"error": exc.message}, headers=exc.headers)
        except InvalidInputError as exc:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": exc.message})
        except ModelNotFoundError as exc:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": exc.message})
        except ModelNotReadyError as exc:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": exc.message}, headers={"Retry-After": "1"})
        except InferenceError as exc:
            log.debug("inference failed: %s", exc.message)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": exc.message})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("unexpected error serving %s %s", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.command == "POST":
                self.close_connection = True
                raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return b""
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw!r}")
        if length > self.server.config.max_body_bytes:
            if not self._discard(length):
                self.close_connection = True  # the unread body would be parsed as the next request otherwise
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the {self.server.config.max_body_bytes}-byte limit",
            )
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise ConnectionError("client closed the connection mid-body")
        return body

    def _discard(self, length: int) -> bool:
        """Read and drop a refused body of moderate size, so the client reads our 413 instead of a reset."""
        if length > _DISCARD_LIMIT:
            return False
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                return False
            remaining -= len(chunk)
        return True

    def _route(self, method: str, body: bytes) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        if not parts or parts[0] != "v2":
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path!r} (the API lives under /v2)")
        rest = parts[1:]
        if rest == [] or rest[0] == "health":
            self._require(method, "GET")
            if rest == []:
                return self._send_json(HTTPStatus.OK, server_metadata())
            if rest == ["health", "live"]:
                return self._send_json(HTTPStatus.OK, {"live": True})
            if rest == ["health", "ready"]:
                ready = self.server.model_host.active is not None
                return self._send_json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready})
        if len(rest) >= 2 and rest[0] == "models":
            name, tail = rest[1], rest[2:]
            version: int | None = None
            if len(tail) >= 2 and tail[0] == "versions":
                version = _parse_version(tail[1])
                tail = tail[2:]
            if tail == []:
                self._require(method, "GET")
                return self._send_json(HTTPStatus.OK, self._metadata(self._served(name, version)))
            if tail == ["ready"]:
                self._require(method, "GET")
                model = self._served(name, version)
                return self._send_json(HTTPStatus.OK, {"name": name, "version": str(model.ref.version), "ready": True})
            if tail == ["stats"]:
                self._require(method, "GET")
                return self._send_json(HTTPStatus.OK, self._stats(self._served(name, version)))
            if tail == ["infer"]:
                self._require(method, "POST")
                return self._infer(name, version, body)
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path!r}")

    def _require(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise _HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} is not allowed here (use {allowed})",
                headers={"Allow": allowed},
            )

    # -- endpoints ---------------------------------------------------------------------------------

    def _served(self, name: str, version: int | None) -> LoadedModel:
        model = self.server.model_host.active
        if model is None:
            raise ModelNotReadyError("no model is being served yet")
        if model.ref.name != name or (version is not None and model.ref.version != version):
            wanted = name + (f" version {version}" if version is not None else "")
            raise ModelNotFoundError(
                f"{wanted} is not being served (serving {model.ref.name} version {model.ref.version})",
                name=name,
                version=version,
            )
        return model

    @staticmethod
    def _metadata(model: LoadedModel) -> dict[str, Any]:
        return {
            "name": model.ref.name,
            "versions": [str(model.ref.version)],
            "platform": PLATFORMS.get(model.runtime.runtime, model.runtime.runtime),
            "inputs": tensor_metadata(model.inputs),
            "outputs": tensor_metadata(model.outputs),
            "parameters": {
                "backend": model.backend,
                "providers": list(model.providers),
                "variant": model.variant,
            },
        }

    def _stats(self, model: LoadedModel) -> dict[str, Any]:
        stats = self.server.model_host.stats(version=model.ref.version, name=model.ref.name)
        return {
            "name": model.ref.name,
            "version": str(model.ref.version),
            "requests": stats.requests,
            "errors": stats.errors,
            "rejected": stats.rejected,
            "latency_ms": stats.latency_ms(),
        }

    def _infer(self, name: str, version: int | None, body: bytes) -> None:
        header = self.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise _HttpError(HTTPStatus.BAD_REQUEST, f"{HEADER_LENGTH} must be an integer") from None
        model = self._served(name, version)  # 404/503 before the body is decoded
        request = parse_infer_request(body, header_length=header_length)
        check_request_fits(request, model.inputs, model.outputs)
        served = self.server.model_host.run(request.inputs, name=name, version=version)
        payload, json_length = encode_infer_response(
            request, served.outputs, model_name=served.model.ref.name, model_version=served.model.ref.version
        )
        if json_length is None:
            return self._send(HTTPStatus.OK, payload, JSON)
        return self._send(HTTPStatus.OK, payload, "application/octet-stream", {HEADER_LENGTH: str(json_length)})

    # -- responses ---------------------------------------------------------------------------------

    def _send_json(self, status: HTTPStatus, obj: Any, *, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), JSON, headers)

    def _send(
        self, status: HTTPStatus, payload: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


def _parse_version(text: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise _HttpError(HTTPStatus.NOT_FOUND, f"model version {text!r} is not a version number")
    return int(text)


class InferenceHttpServer:
    """Serves a ``ModelHost`` over the Open Inference Protocol from a background thread.

    ``with InferenceHttpServer(host, HttpConfig(port=0)) as server: ... server.url ...``
    """

    def __init__(self, host: ModelHost, config: HttpConfig | None = None) -> None:
        self.config = config or HttpConfig()
        self._server = _Server((self.config.host, self.config.port), host, self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> InferenceHttpServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="oip-http", daemon=True
            )
            self._thread.start()
            log.info("serving the Open Inference Protocol on %s", self.url)
        return self

    def close(self) -> None:
        """Stop accepting, close open keep-alive connections, release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.drop_connections()
        self._server.server_close()

    def __enter__(self) -> InferenceHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
