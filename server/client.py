"""How the ``edgefleet`` CLI reaches the control plane: over the HTTP API, or in-process.

``connect`` picks, in this order: ``--server URL``, ``$EDGEFLEET_SERVER``, ``[client] server`` in
the config, or the API of a server running on this home (it writes ``server.json``). With a
server it speaks HTTP with a bearer token (``$EDGEFLEET_TOKEN`` or the token file); without
one, it calls the very same route handlers in-process on the local registry (actor
``local:<user>``), and the running-or-next server publishes what they wrote. Either way the
calls are the API's routes by name, so the CLI is an API client and cannot do anything the
API cannot.
"""

from __future__ import annotations

import importlib
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from server.access import local_actor
from server.api import EXTRA_ROUTES as _EXTRA
from server.api import ROUTES, Api, Route
from server.artifacts import ArtifactStore
from server.config import ServerConfig, load_config, runtime_info
from server.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
)
from server.keys import read_token_file
from server.registry.fleet import open_registry
from server.service import FleetService

_ERRORS: Mapping[str, type[ServerError]] = {
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "invalid": InvalidRequestError,
    "unauthorized": AuthError,
    "forbidden": ForbiddenError,
    "too_large": PayloadTooLargeError,
}


class ApiClient(Protocol):
    description: str

    def call(self, name: str, *, path: Mapping[str, str] | None = None, query: Mapping[str, Any] | None = None,
             body: Any = None, timeout: float | None = None) -> Any: ...


class RemoteError(ServerError):
    """An error the server reported with a code this client has no class for."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _route(name: str) -> Route:
    for r in [*ROUTES, *_EXTRA]:
        if r.name == name:
            return r
    raise KeyError(name)


class HttpClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 120.0,
                 ca_cert: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.description = f"server {self.base_url}"
        #: https:// with a private CA (``[client] ca_cert``); None = the system trust store
        self.ssl_context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None

    def url(self, name: str, path: Mapping[str, str] | None = None, query: Mapping[str, Any] | None = None) -> str:
        route = _route(name)
        url = route.path
        for key, value in (path or {}).items():
            url = url.replace("{" + key + "}", quote(str(value), safe=""))
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return self.base_url + url + (("?" + urlencode(q)) if q else "")

    def call(self, name: str, *, path: Mapping[str, str] | None = None, query: Mapping[str, Any] | None = None,
             body: Any = None, timeout: float | None = None) -> Any:
        route = _route(name)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(name, path, query), data=data, method=route.method)  # noqa: S310
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout,  # noqa: S310 - http(s) only
                                        context=self.ssl_context) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise _decode_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            hint = ""
            if data is not None and len(data) > 1 << 20 and "reset" in str(exc).lower():
                hint = (f" (the server closes the connection on a {len(data)}-byte body over its [api] max_body_bytes "
                        "or from a refused token before reading it)")
            raise ServerError(f"cannot reach the edgefleet server at {self.base_url}: {exc}{hint}") from exc
        if ctype.startswith("application/json"):
            return json.loads(raw)
        return raw.decode()


def _decode_error(exc: urllib.error.HTTPError) -> ServerError:
    try:
        err = json.loads(exc.read())["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return ServerError(f"HTTP {exc.code} from the server")
    cls = _ERRORS.get(code)
    return cls(message) if cls is not None else RemoteError(code, message)


class LocalClient:
    """The API's handlers called in-process on this home's registry (no server needed)."""

    def __init__(self, home: Path, config_path: Path | None = None) -> None:
        # startup cost: the catalog brings the compression pipeline (~2 s); an HTTP client never loads it
        from server.build_ops import default_build_source  # noqa: PLC0415

        config = load_config(home, config_path)
        registry = open_registry(config)
        service = FleetService(config, registry, builds=default_build_source(home),
                               artifacts=ArtifactStore(config.paths.artifacts_dir, registry),
                               profiles=default_profiles())
        self.api = Api(service)
        self.actor = local_actor()
        self.description = f"local registry {registry.db.description}"

    def call(self, name: str, *, path: Mapping[str, str] | None = None, query: Mapping[str, Any] | None = None,
             body: Any = None, timeout: float | None = None) -> Any:
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        result = self.api.call(name, actor=self.actor, path=path, query=q, body=body)
        # round-trip through JSON so both transports hand the CLI the same shapes
        return json.loads(json.dumps(result, default=str))


def default_profiles() -> Any:
    """The compression pipeline's profiles (``server.profiles.load_profiles``) when installed: device
    profiles are then checked against ``firmware_profiles/``; without it any well-formed name is taken."""
    try:
        module = importlib.import_module("server.profiles")
    except ImportError:
        return None
    loader: Any = getattr(module, "load_profiles", None)
    if loader is None:
        return None

    class _Profiles:
        def profile_names(self) -> set[str]:
            try:
                return set(loader())
            except (ServerError, OSError):  # a broken profile file must not block fleet commands
                return set()

    return _Profiles()


def remote_client(home: Path, *, server: str | None = None, config_path: Path | None = None) -> HttpClient | None:
    """An HTTP client when a server is configured explicitly (``--server``, ``$EDGEFLEET_SERVER`` or
    ``[client] server``), else None: the model commands then work on the local catalog, even while a
    server runs on this home (builds are local CPU work either way)."""
    config = load_config(home, config_path)
    url: str | None = server or os.environ.get("EDGEFLEET_SERVER") or config.client.server
    if not url:
        return None
    return _http(config, url)


def _http(config: ServerConfig, url: str) -> HttpClient:
    """An HTTP client for ``url`` with the token from ``$EDGEFLEET_TOKEN`` or the token file."""
    token = os.environ.get("EDGEFLEET_TOKEN") or read_token_file(config.resolve(config.client.token_file))
    if not token:
        raise AuthError(
            f"no API token for {url}: set $EDGEFLEET_TOKEN or write it to {config.resolve(config.client.token_file)} "
            "(`edgefleet tokens create NAME --role ROLE` on the server prints one)"
        )
    ca = config.resolve(config.client.ca_cert) if config.client.ca_cert else None
    return HttpClient(url, token, ca_cert=ca)


def connect(home: Path, *, server: str | None = None, config_path: Path | None = None) -> ApiClient:
    config = load_config(home, config_path)
    url: str | None = server or os.environ.get("EDGEFLEET_SERVER") or config.client.server
    if not url:
        info = runtime_info(home)
        url = str(info["api_url"]) if info else None
    if not url:
        return LocalClient(home, config_path)
    return _http(config, url)
