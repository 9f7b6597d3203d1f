"""Where the server keeps its state, and (grown by the control plane) its TOML configuration.

Layout under the server home (``--home``, ``$EDGEFLEET_HOME``, default ``~/.local/share/edgefleet``):

    registry.db      SQLite registry (WAL), unless [registry] url names PostgreSQL
    models/          registered source models and their data sets, content-addressed
    builds/          compressed per-profile variants with provenance
    artifacts/       sealed (encrypted, chunked) artifacts, by artifact id
    keys/            the server signing key, API tokens, broker passwords (0600)
    server.toml      configuration (see ``ServerConfig``; every key optional)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson JetPack 6)
    import tomli as tomllib


def default_home() -> Path:
    env = os.environ.get("EDGEFLEET_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "edgefleet"


#: what a running server writes about itself under its home (API URL, pid)
RUNTIME_FILE = "server.json"


def runtime_info(home: Path) -> dict[str, object] | None:
    """What a running server on this home wrote about itself (None when none is alive)."""
    try:
        info = json.loads((home / RUNTIME_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(info)


def private_home(home: Path) -> Path:
    """Create the server home 0700 (or tighten an existing one): models, data sets, the registry and keys
    under it are nobody else's business. Files written under it are 0600 as well (``atomic_write``)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if home.stat().st_mode & 0o077:
        home.chmod(0o700)
    return home


@dataclass(frozen=True)
class ServerPaths:
    home: Path

    @property
    def registry_db(self) -> Path:
        return self.home / "registry.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def builds_dir(self) -> Path:
        return self.home / "builds"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"


# -- TOML server configuration ---------------------------------------------------------------------
#
# ``{home}/server.toml`` (or ``--config PATH``). Every section and key is optional; a missing file
# means every default. Unknown keys are an error (a typo must not silently fall back to a default).
# Limits are documented on each field and enforced by ``validate()``.
#
#     [broker]
#     url = "mqtt://127.0.0.1:1883"          # mqtts:// for TLS
#     username = "edgefleet-server"
#     password_file = "keys/broker-server.password"   # relative paths are under the home
#     ca_cert = "broker/tls/ca.crt"
#     shared_subscriptions = false           # true with several server processes (MQTT 5 $share)
#     shards = ["mqtts://mq0:8883", "mqtts://mq1:8883"]   # several independent brokers (docs/scale.md)
#     peer_logins = ["edgefleet-server", "edgefleet-server-2"]   # every server's login: takeover (docs/scale.md)
#
#     [api]
#     host = "127.0.0.1"
#     port = 8470
#     tls_cert = "api/tls/server.crt"        # HTTPS (with tls_key); empty = plain HTTP
#     max_connections = 64
#
#     [rollout]
#     canary_percent = 10.0
#     wave_percent = 25.0
#     max_failures_percent = 10.0
#     device_timeout_s = 1800.0
#
#     [quotas]                               # per device; see QuotasSection and docs/operations.md
#     events_per_minute = 300
#     bytes_per_minute = 2097152
#
#     [registry]
#     url = "postgresql://edgefleet@db.example/edgefleet"   # empty = SQLite {home}/registry.db
#
# and [server], [publisher], [retention] as in the dataclasses below.


DEFAULT_API_PORT = 8470
DEFAULT_MQTT_PORT = 1883


def _check(cond: bool, section: str, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"[{section}] {key}: {why}", field=f"{section}.{key}")


#: the registry URL when ``[registry] url`` is empty (containers, the test suite's PostgreSQL pass)
REGISTRY_URL_ENV = "EDGEFLEET_REGISTRY_URL"


@dataclass(frozen=True)
class RegistrySection:
    #: empty = SQLite at {home}/registry.db (or $EDGEFLEET_REGISTRY_URL when set); "sqlite:///PATH";
    #: "postgresql://user:password@host:port/dbname" (or psycopg's key=value form after "postgresql://")
    url: str = ""

    def validate(self) -> None:
        _check(self.url == "" or self.url.startswith(("sqlite:///", "postgresql://", "postgres://")), "registry",
               "url", "must be empty, sqlite:///PATH or postgresql://...")
        _check(len(self.url) <= 1024, "registry", "url", "at most 1024 characters")


@dataclass(frozen=True)
class ServerSection:
    #: Identifies this process in leases and logs; empty = hostname-pid-random (unique per process).
    instance_id: str = ""
    #: "debug" | "info" | "warning" | "error"
    log_level: str = "info"

    def validate(self) -> None:
        _check(self.log_level in ("debug", "info", "warning", "error"), "server", "log_level",
               "one of debug, info, warning, error")
        _check(len(self.instance_id) <= 128, "server", "instance_id", "at most 128 characters")


def _login_ok(login: str) -> bool:
    return 0 < len(login) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in login)


@dataclass(frozen=True)
class BrokerSection:
    #: mqtt://host:port or mqtts://host:port (TLS)
    url: str = f"mqtt://127.0.0.1:{DEFAULT_MQTT_PORT}"
    #: empty = anonymous (only for a private test broker)
    username: str = ""
    #: file holding the password (0600); relative to the home; empty = no password
    password_file: str = ""
    #: CA certificate for mqtts://; empty = system trust store
    ca_cert: str = ""
    #: MQTT client id; empty = "edgefleet-server-<instance_id>"
    client_id: str = ""
    #: MQTT 5 shared subscription for device traffic, so several server processes split it
    shared_subscriptions: bool = False
    #: 5..600 s
    keepalive_s: int = 30
    #: several independent brokers, in order (docs/scale.md): each device uses the one
    #: ``agent.protocol.shards.shard_of`` names and the server connects to all of them (same login,
    #: CA and client id on each); ``url`` is then unused. Empty = the one broker of ``url``.
    shards: tuple[str, ...] = ()
    #: the broker logins of every server process sharing this broker (``broker config --server-logins N`` prints
    #: the list), so a survivor can take over a dead peer's session on a broker that binds client id to login
    #: (``use_username_as_clientid``, the generated config): it connects as the peer, with the password in
    #: ``keys/broker-server.password`` (edgefleet-server) or ``keys/broker-LOGIN.password``, which must then be
    #: in this home too (checked at server start). Needs ``username`` and ``shared_subscriptions``; the client id
    #: is then the login. Empty = no takeover on a secured broker (docs/scale.md).
    peer_logins: tuple[str, ...] = ()

    def validate(self) -> None:
        for key, url in [("url", self.url)] + [("shards", u) for u in self.shards]:
            parts = urlsplit(url)
            _check(parts.scheme in ("mqtt", "mqtts"), "broker", key, "must start with mqtt:// or mqtts://")
            _check(bool(parts.hostname), "broker", key, "needs a host")
            try:
                port = parts.port
            except ValueError as exc:
                raise ConfigError(f"[broker] {key}: bad port ({exc})", field=f"broker.{key}") from exc
            _check(port is None or 0 < port < 65536, "broker", key, "port out of range")
        _check(len(self.shards) <= 256, "broker", "shards", "at most 256 brokers")
        _check(len(set(self.shards)) == len(self.shards), "broker", "shards", "a broker is listed twice")
        _check(5 <= self.keepalive_s <= 600, "broker", "keepalive_s", "must be within 5..600")
        if self.peer_logins:
            _check(len(self.peer_logins) <= 256, "broker", "peer_logins", "at most 256 logins")
            _check(len(set(self.peer_logins)) == len(self.peer_logins), "broker", "peer_logins",
                   "a login is listed twice")
            _check(all(_login_ok(login) for login in self.peer_logins), "broker", "peer_logins",
                   "logins are 1..64 letters, digits, '.', '_' or '-'")
            _check(bool(self.username), "broker", "peer_logins", "needs [broker] username (a secured broker)")
            _check(self.shared_subscriptions, "broker", "peer_logins", "needs shared_subscriptions = true")
            _check(self.client_id in ("", self.username), "broker", "peer_logins",
                   "the broker binds client id to login: leave client_id empty (it is the username)")

    @property
    def urls(self) -> tuple[str, ...]:
        """The brokers this server connects to: the shards, else ``url``."""
        return self.shards or (self.url,)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else DEFAULT_MQTT_PORT)


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    #: 0 = pick a free port (tests); the chosen port is written to ``{home}/server.json``
    port: int = DEFAULT_API_PORT
    #: serve /metrics without a token (Prometheus scrapers usually have none)
    public_metrics: bool = True
    #: longest long-poll wait a client may ask for (events --follow), 1..120 s
    max_wait_s: float = 30.0
    #: cap on any request body, 1 KiB..1 GiB (a larger declared Content-Length is refused unread)
    max_body_bytes: int = 256 * 1024 * 1024
    #: cap on a request's line and headers, 4 KiB..1 MiB (431 past it)
    max_header_bytes: int = 32 * 1024
    #: past this many open connections a request gets 503; past twice as many a connection is closed
    max_connections: int = 64
    #: the request line and headers must arrive within this many seconds of the connection opening (on a
    #: kept-alive connection: of the request's first byte), 1..300
    header_timeout_s: float = 10.0
    #: the whole body must arrive within this many seconds of the headers, 1..3600
    body_timeout_s: float = 300.0
    #: an idle keep-alive connection is closed after this many seconds, 1..600
    idle_timeout_s: float = 15.0
    #: serve HTTPS with this certificate chain and key (PEM; relative to the home); empty = plain HTTP
    tls_cert: str = ""
    tls_key: str = ""

    def validate(self) -> None:
        _check(0 <= self.port < 65536, "api", "port", "must be within 0..65535")
        _check(1.0 <= self.max_wait_s <= 120.0, "api", "max_wait_s", "must be within 1..120")
        _check(1024 <= self.max_body_bytes <= 1 << 30, "api", "max_body_bytes", "must be within 1 KiB..1 GiB")
        _check(4096 <= self.max_header_bytes <= 1 << 20, "api", "max_header_bytes", "must be within 4 KiB..1 MiB")
        _check(1 <= self.max_connections <= 10000, "api", "max_connections", "must be within 1..10000")
        _check(1.0 <= self.header_timeout_s <= 300.0, "api", "header_timeout_s", "must be within 1..300")
        _check(1.0 <= self.body_timeout_s <= 3600.0, "api", "body_timeout_s", "must be within 1..3600")
        _check(1.0 <= self.idle_timeout_s <= 600.0, "api", "idle_timeout_s", "must be within 1..600")
        _check(bool(self.tls_cert) == bool(self.tls_key), "api", "tls_cert",
               "tls_cert and tls_key go together (both or neither)")


@dataclass(frozen=True)
class PublisherSection:
    #: QoS 1 publishes in flight at once (paced: the broker's queues never overflow), 1..1000; as many again may
    #: wait in the server's MQTT client, which sends each as an acknowledgement frees the window (server/publisher.py)
    max_inflight: int = 64
    #: how long chunk requests for one artifact are collected before a broadcast round, 0..10 s
    chunk_window_s: float = 0.5
    #: stream each artifact once on edgefleet/v1/art/{id}; false = serve every request per device
    broadcast: bool = True
    #: passed-over chunks wanted by at least this many devices go into another broadcast round
    late_broadcast_threshold: int = 3
    #: broker fan-out budget for shared streams, MB/s; 0 = unpaced. A stream expected by N devices goes at
    #: this / N MB/s, so the broker's egress (N copies) stays near it (docs/simulator.md measures why)
    broadcast_egress_mb_s: float = 0.0
    #: follow the subscribers: when a shared stream runs more than this many KiB ahead of its slowest
    #: subscriber (the broker's $SYS counters), the fan-out budget is halved, and raised again as they
    #: catch up (server/fanout.py); keep it under the broker's per-client queue; 0 = the fixed budget
    broadcast_max_lead_kib: int = 1024
    #: lifetime of a signed desired state, 60 s..365 days
    desired_ttl_s: float = 7 * 86400.0
    #: re-sign a desired state this long before it expires (must be < desired_ttl_s)
    resign_margin_s: float = 86400.0
    #: lifetime of a signed command, 10 s..7 days
    command_ttl_s: float = 3600.0
    #: offer a delta (a patch over a version the device keeps) when it is at most this share of the full
    #: artifact, 0..1; 0 = always full (docs/protocol.md, delta updates)
    delta_max_ratio: float = 0.6
    #: a delta is built on a background thread; a dispatch waits at most this long for it, then sends the full
    #: artifact (later dispatches of the deployment get the delta once it is built), 0..600 s
    delta_build_wait_s: float = 10.0

    def validate(self) -> None:
        _check(1 <= self.max_inflight <= 1000, "publisher", "max_inflight", "must be within 1..1000")
        _check(0.0 <= self.chunk_window_s <= 10.0, "publisher", "chunk_window_s", "must be within 0..10")
        _check(self.late_broadcast_threshold >= 1, "publisher", "late_broadcast_threshold", "must be >= 1")
        _check(0.0 <= self.broadcast_egress_mb_s <= 1e6, "publisher", "broadcast_egress_mb_s",
               "must be within 0 (unpaced)..1e6")
        _check(0 <= self.broadcast_max_lead_kib <= 1 << 20, "publisher", "broadcast_max_lead_kib",
               "must be within 0 (fixed budget)..1048576")
        _check(60.0 <= self.desired_ttl_s <= 365 * 86400.0, "publisher", "desired_ttl_s",
               "must be within 60 s..365 days")
        _check(0.0 < self.resign_margin_s < self.desired_ttl_s, "publisher", "resign_margin_s",
               "must be > 0 and < desired_ttl_s")
        _check(10.0 <= self.command_ttl_s <= 7 * 86400.0, "publisher", "command_ttl_s", "must be within 10 s..7 days")
        _check(0.0 <= self.delta_max_ratio <= 1.0, "publisher", "delta_max_ratio", "must be within 0..1")
        _check(0.0 <= self.delta_build_wait_s <= 600.0, "publisher", "delta_build_wait_s", "must be within 0..600")


@dataclass(frozen=True)
class RolloutSection:
    """Defaults for ``edgefleet deploy`` flags, and the rollout driver's timing."""

    canary_percent: float = 10.0
    wave_percent: float = 25.0
    max_failures_percent: float = 10.0
    #: device-side probation in seconds; None = the build's HealthSpec value
    probation_s: float | None = None
    #: a device that makes no progress for this long counts as failed, 5 s..7 days
    device_timeout_s: float = 1800.0
    #: how often the driver re-evaluates running rollouts, 0.05..10 s
    tick_s: float = 0.5
    #: how long a driver's claim on a deployment lasts without renewal, 1..300 s
    lease_ttl_s: float = 15.0

    def validate(self) -> None:
        _check(0.0 <= self.canary_percent <= 100.0, "rollout", "canary_percent", "must be within 0..100")
        _check(0.0 < self.wave_percent <= 100.0, "rollout", "wave_percent", "must be within (0, 100]")
        _check(0.0 <= self.max_failures_percent <= 100.0, "rollout", "max_failures_percent",
               "must be within 0..100")
        _check(self.probation_s is None or 0.0 <= self.probation_s <= 7 * 86400.0, "rollout", "probation_s",
               "must be within 0 s..7 days")
        _check(5.0 <= self.device_timeout_s <= 7 * 86400.0, "rollout", "device_timeout_s",
               "must be within 5 s..7 days")
        _check(0.05 <= self.tick_s <= 10.0, "rollout", "tick_s", "must be within 0.05..10")
        _check(1.0 <= self.lease_ttl_s <= 300.0, "rollout", "lease_ttl_s", "must be within 1..300")
        _check(self.lease_ttl_s > 2 * self.tick_s, "rollout", "lease_ttl_s", "must exceed 2 x tick_s")


@dataclass(frozen=True)
class RetentionSection:
    #: telemetry is averaged into buckets of this many seconds, 1 s..1 day
    telemetry_bucket_s: float = 60.0
    #: telemetry buckets older than this are deleted, >= 1 hour
    telemetry_s: float = 7 * 86400.0
    #: events older than this are deleted (the audit log is never pruned), >= 1 hour
    events_s: float = 30 * 86400.0

    def validate(self) -> None:
        _check(1.0 <= self.telemetry_bucket_s <= 86400.0, "retention", "telemetry_bucket_s",
               "must be within 1 s..1 day")
        _check(self.telemetry_s >= 3600.0, "retention", "telemetry_s", "must be >= 3600")
        _check(self.events_s >= 3600.0, "retention", "events_s", "must be >= 3600")


@dataclass(frozen=True)
class QuotasSection:
    """Per-device budgets: a device over one is throttled (its excess is dropped, not stored) and reported
    (a ``quota.exceeded`` event per device and quota per minute, ``edgefleet_quota_throttled_total``)."""

    #: events a device may have recorded per minute, 1..100,000
    events_per_minute: int = 300
    #: bytes of state, telemetry and events accepted from one device per minute, 16 KiB..1 GiB
    bytes_per_minute: int = 2 << 20
    #: chunks a device may ask for again per artifact, as a multiple of the artifact's chunk count, 0..100
    chunk_resend_factor: float = 2.0
    #: ... plus this many, so a small artifact can still be retried a few times, 0..1,000,000
    chunk_resend_floor: int = 64
    #: how often the server re-reads retained messages on device up-topics and clears any but up/state,
    #: 5 s..1 day
    retained_sweep_s: float = 60.0

    def validate(self) -> None:
        _check(1 <= self.events_per_minute <= 100_000, "quotas", "events_per_minute", "must be within 1..100000")
        _check(16 * 1024 <= self.bytes_per_minute <= 1 << 30, "quotas", "bytes_per_minute",
               "must be within 16 KiB..1 GiB")
        _check(0.0 <= self.chunk_resend_factor <= 100.0, "quotas", "chunk_resend_factor", "must be within 0..100")
        _check(0 <= self.chunk_resend_floor <= 1_000_000, "quotas", "chunk_resend_floor",
               "must be within 0..1000000")
        _check(5.0 <= self.retained_sweep_s <= 86400.0, "quotas", "retained_sweep_s", "must be within 5 s..1 day")


@dataclass(frozen=True)
class ClientSection:
    """How the ``edgefleet`` CLI reaches a server; empty server = work on the local registry directly."""

    server: str = ""
    #: file holding the API token; relative to the home
    token_file: str = "keys/cli.token"  # noqa: S105 - a path, not a secret
    #: CA certificate to trust for an https:// server (relative to the home); empty = system trust store
    ca_cert: str = ""

    def validate(self) -> None:
        if self.server:
            _check(urlsplit(self.server).scheme in ("http", "https"), "client", "server",
                   "must be an http:// or https:// URL")


@dataclass(frozen=True)
class ServerConfig:
    home: Path
    server: ServerSection = field(default_factory=ServerSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    api: ApiSection = field(default_factory=ApiSection)
    publisher: PublisherSection = field(default_factory=PublisherSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    quotas: QuotasSection = field(default_factory=QuotasSection)
    client: ClientSection = field(default_factory=ClientSection)
    registry: RegistrySection = field(default_factory=RegistrySection)

    @property
    def paths(self) -> ServerPaths:
        return ServerPaths(self.home)

    @property
    def registry_url(self) -> str:
        """Where the registry is: ``[registry] url``, else ``$EDGEFLEET_REGISTRY_URL``, else "" (SQLite)."""
        return self.registry.url or os.environ.get(REGISTRY_URL_ENV, "")

    def resolve(self, relative: str) -> Path:
        """A config path: absolute as written, else under the home."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.home / p

    def validate(self) -> ServerConfig:
        for section in (self.server, self.broker, self.api, self.publisher, self.rollout, self.retention,
                        self.quotas, self.client, self.registry):
            section.validate()
        return self


_SECTIONS: Mapping[str, type] = {
    "server": ServerSection,
    "broker": BrokerSection,
    "api": ApiSection,
    "publisher": PublisherSection,
    "rollout": RolloutSection,
    "retention": RetentionSection,
    "quotas": QuotasSection,
    "client": ClientSection,
    "registry": RegistrySection,
}


def _coerce(section: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "None" in annotation and value is None:
        return None
    if "tuple[str" in annotation and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    expected = type(default) if default is not None else float
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"[{section}] {key}: expected {expected.__name__}, got {type(value).__name__}",
                          field=f"{section}.{key}")
    return value


def config_from_mapping(home: Path, data: Mapping[str, Any]) -> ServerConfig:
    """Build and validate a config from parsed TOML (unknown sections or keys are errors)."""
    cfg = ServerConfig(home=home)
    for name, raw in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(_SECTIONS)})", field=name)
        if not isinstance(raw, dict):
            raise ConfigError(f"[{name}] must be a table", field=name)
        current = getattr(cfg, name)
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"[{name}] unknown key {key!r} (known: {', '.join(known)})", field=f"{name}.{key}")
            values[key] = _coerce(name, key, value, getattr(current, key), str(known[key].type))
        cfg = replace(cfg, **{name: replace(current, **values)})
    return cfg.validate()


def config_path(home: Path) -> Path:
    return home / "server.toml"


def load_config(home: Path, path: Path | None = None) -> ServerConfig:
    """Read ``path`` (default ``{home}/server.toml``); a missing default file means all defaults."""
    target = path or config_path(home)
    if not target.exists():
        if path is not None:
            raise ConfigError(f"config file {target} does not exist")
        return ServerConfig(home=home).validate()
    try:
        data = tomllib.loads(target.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {target}: {exc}") from exc
    return config_from_mapping(home, data)
