"""The agent's configuration: one TOML file, parsed into frozen dataclasses, every field checked.

Example (``edgefleet-agent init`` writes one like it)::

    device_id = "pi-0042"
    profile = "rpi4-aarch64-tflite-int8"
    store_dir = "/var/lib/edgefleet-agent"

    [broker]
    host = "mqtt.example.com"
    port = 8883
    tls = true                         # the default; `tls = false` (init --no-tls) for plain MQTT on port 1883
    ca_cert = "ca.crt"                 # relative paths are relative to this file
    username = "pi-0042"
    password_file = "mqtt-password"

    [keys]
    device_key = "device.key"          # X25519 private key, 0600
    server_keys = ["server.pub"]       # Ed25519 public keys of the server (the trust anchor)

    [models]
    keep_versions = 3

    [transfer]
    chunk_timeout_s = 5.0

    [telemetry]
    interval_s = 30.0

    [http]
    port = 8080

    [log]
    format = "json"

Unknown keys are errors (a typo must not silently fall back to a default). A ConfigError
names the offending field as ``section.key``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.protocol.topics import DEVICE_ID_PATTERN
from agent.runtime.http import HttpConfig
from agent.runtime.inference import InferenceOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 (Jetson JetPack 6)
    import tomli as tomllib

T = TypeVar("T")
MAX_CONFIG_BYTES = 256 * 1024
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to reach the MQTT broker.

    Args:
        host, port: the broker (1883 plain, 8883 TLS by convention).
        tls: connect with TLS; ``ca_cert`` pins a private CA (system CAs when unset).
        client_cert, client_key: optional TLS client certificate (mutual TLS).
        username, password: per-device credentials; ``password_file`` keeps the secret out of this file.
        keepalive_s: MQTT keepalive, [5, 3600].
        reconnect_min_s, reconnect_max_s: exponential reconnect backoff bounds.
    """

    host: str = "127.0.0.1"
    port: int = 8883
    #: on unless the config says ``tls = false`` (``edgefleet-agent init --no-tls``): plain MQTT is for a
    #: trusted network only, and has to be asked for
    tls: bool = True
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0


@dataclass(frozen=True)
class KeysConfig:
    device_key: Path = Path("device.key")
    server_keys: tuple[Path, ...] = (Path("server.pub"),)


@dataclass(frozen=True)
class ModelsConfig:
    """The model store. ``keep_versions`` committed versions stay on disk for rollback without download."""

    keep_versions: int = 3
    max_artifact_bytes: int = 1 << 30
    min_free_bytes: int = 32 << 20
    #: RAM the loaded models may take together (0 = no budget); during probation both versions are loaded
    memory_budget_bytes: int = 0
    #: keep the previous committed version loaded after a commit, so a rollback to it needs no reload;
    #: it counts against ``memory_budget_bytes`` and is released first when a new candidate needs the room
    warm_standby: bool = True


@dataclass(frozen=True)
class TransferConfig:
    """Chunk transfer timing: re-request missing chunks after ``chunk_timeout_s`` of silence, doubling to the max."""

    chunk_timeout_s: float = 5.0
    chunk_timeout_max_s: float = 60.0
    progress_interval_s: float = 5.0
    #: take a delta offer only when it is at most this share of the full artifact (else the full one)
    delta_max_ratio: float = 0.6


@dataclass(frozen=True)
class LifecycleConfig:
    """Restart-loop limit, how often probation is sampled, and tolerated clock skew for expiry checks.

    ``latency_scale`` (>= 1) multiplies every latency budget the server's health spec sets (warm-up check and
    probation): for a board known to be slower than its profile assumes, such as an emulated one (scripts/arm_check
    runs the agent under qemu at ~50x slower and sets it there). The server's budgets stay the real ones.
    """

    restart_limit: int = 3
    probation_check_s: float = 1.0
    clock_skew_s: float = 300.0
    latency_scale: float = 1.0
    #: the off-path benchmark after warm-up (and of a probe artifact): timed runs, a wall-time cap, and the
    #: share of one core it may take (it sleeps between runs so the serving model keeps the rest); 0 runs: off
    benchmark_runs: int = 20
    benchmark_max_s: float = 3.0
    benchmark_cpu_share: float = 0.5
    #: a probe (variants the server sends to be timed, never served): the share of one core it may take, its
    #: wall-time cap per variant and pass, and the inference threads of its side session (1: all its work on
    #: the one SCHED_IDLE thread that times it)
    probe_cpu_share: float = 0.25
    probe_max_s: float = 20.0
    probe_threads: int = 1
    #: the probe thread's scheduling: "idle" (SCHED_IDLE: only CPU time no normal thread wants) or "nice" (19)
    probe_priority: str = "idle"


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = 30.0


@dataclass(frozen=True)
class LogConfig:
    format: str = "json"
    level: str = "info"


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    profile: str
    store_dir: Path
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None


#: The defaults, written once: the dataclasses above say them, the parser below reads them from here.
DEFAULTS = AgentConfig(device_id="", profile="", store_dir=Path())


# -- loading ---------------------------------------------------------------------------------------


def load_config(path: Path) -> AgentConfig:
    """Read and validate a TOML config; ConfigError names the field that is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}", field=None) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return parse_config(data, base=path.resolve().parent, source=path.resolve())


def parse_config(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> AgentConfig:
    top = _Section(data, "", base)
    broker = top.section("broker")
    password = broker.opt_text("password", max_len=1024)
    password_file = broker.opt_path("password_file")
    if password is not None and password_file is not None:
        raise ConfigError("set broker.password or broker.password_file, not both", field="broker.password")
    if password_file is not None:
        password = _read_secret(password_file, "broker.password_file")
    tls = broker.flag("tls", DEFAULTS.broker.tls)
    broker_cfg = BrokerConfig(
        host=broker.text("host", DEFAULTS.broker.host, max_len=253),
        port=broker.integer("port", 8883 if tls else 1883, lo=1, hi=65535),
        tls=tls,
        ca_cert=broker.opt_path("ca_cert"),
        client_cert=broker.opt_path("client_cert"),
        client_key=broker.opt_path("client_key"),
        username=broker.opt_text("username", max_len=256),
        password=password,
        password_file=password_file,
        keepalive_s=broker.integer("keepalive_s", DEFAULTS.broker.keepalive_s, lo=5, hi=3600),
        reconnect_min_s=broker.number("reconnect_min_s", DEFAULTS.broker.reconnect_min_s, lo=0.05, hi=600),
        reconnect_max_s=broker.number("reconnect_max_s", DEFAULTS.broker.reconnect_max_s, lo=0.05, hi=3600),
    )
    if broker_cfg.reconnect_max_s < broker_cfg.reconnect_min_s:
        raise ConfigError("broker.reconnect_max_s must be >= reconnect_min_s", field="broker.reconnect_max_s")
    if (broker_cfg.client_cert is None) != (broker_cfg.client_key is None):
        raise ConfigError("broker.client_cert and broker.client_key go together", field="broker.client_cert")
    broker.done()

    keys = top.section("keys")
    server_keys = keys.path_list("server_keys", list(DEFAULTS.keys.server_keys))
    if not server_keys:
        raise ConfigError("keys.server_keys needs at least one server public key", field="keys.server_keys")
    keys_cfg = KeysConfig(device_key=keys.path("device_key", DEFAULTS.keys.device_key), server_keys=tuple(server_keys))
    keys.done()

    models = top.section("models")
    models_cfg = ModelsConfig(
        keep_versions=models.integer("keep_versions", DEFAULTS.models.keep_versions, lo=1, hi=64),
        max_artifact_bytes=models.integer(
            "max_artifact_bytes", DEFAULTS.models.max_artifact_bytes, lo=1024, hi=1 << 40
        ),
        min_free_bytes=models.integer("min_free_bytes", DEFAULTS.models.min_free_bytes, lo=0, hi=1 << 50),
        memory_budget_bytes=models.integer(
            "memory_budget_bytes", DEFAULTS.models.memory_budget_bytes, lo=0, hi=1 << 50
        ),
        warm_standby=models.flag("warm_standby", DEFAULTS.models.warm_standby),
    )
    models.done()

    transfer = top.section("transfer")
    transfer_cfg = TransferConfig(
        chunk_timeout_s=transfer.number("chunk_timeout_s", DEFAULTS.transfer.chunk_timeout_s, lo=0.05, hi=3600),
        chunk_timeout_max_s=transfer.number(
            "chunk_timeout_max_s", DEFAULTS.transfer.chunk_timeout_max_s, lo=0.05, hi=86400
        ),
        progress_interval_s=transfer.number(
            "progress_interval_s", DEFAULTS.transfer.progress_interval_s, lo=0.0, hi=3600
        ),
        delta_max_ratio=transfer.number("delta_max_ratio", DEFAULTS.transfer.delta_max_ratio, lo=0.0, hi=1.0),
    )
    if transfer_cfg.chunk_timeout_max_s < transfer_cfg.chunk_timeout_s:
        raise ConfigError(
            "transfer.chunk_timeout_max_s must be >= chunk_timeout_s", field="transfer.chunk_timeout_max_s"
        )
    transfer.done()

    lifecycle = top.section("lifecycle")
    lifecycle_cfg = LifecycleConfig(
        restart_limit=lifecycle.integer("restart_limit", DEFAULTS.lifecycle.restart_limit, lo=1, hi=100),
        probation_check_s=lifecycle.number("probation_check_s", DEFAULTS.lifecycle.probation_check_s, lo=0.01, hi=600),
        clock_skew_s=lifecycle.number("clock_skew_s", DEFAULTS.lifecycle.clock_skew_s, lo=0, hi=86400 * 7),
        latency_scale=lifecycle.number("latency_scale", DEFAULTS.lifecycle.latency_scale, lo=1.0, hi=1000.0),
        benchmark_runs=lifecycle.integer("benchmark_runs", DEFAULTS.lifecycle.benchmark_runs, lo=0, hi=10_000),
        benchmark_max_s=lifecycle.number("benchmark_max_s", DEFAULTS.lifecycle.benchmark_max_s, lo=0.01, hi=3600),
        benchmark_cpu_share=lifecycle.number(
            "benchmark_cpu_share", DEFAULTS.lifecycle.benchmark_cpu_share, lo=0.01, hi=1.0
        ),
        probe_cpu_share=lifecycle.number("probe_cpu_share", DEFAULTS.lifecycle.probe_cpu_share, lo=0.01, hi=1.0),
        probe_max_s=lifecycle.number("probe_max_s", DEFAULTS.lifecycle.probe_max_s, lo=0.01, hi=3600),
        probe_threads=lifecycle.integer("probe_threads", DEFAULTS.lifecycle.probe_threads, lo=0, hi=256),
        probe_priority=lifecycle.choice("probe_priority", DEFAULTS.lifecycle.probe_priority, ("idle", "nice")),
    )
    lifecycle.done()

    telemetry = top.section("telemetry")
    telemetry_cfg = TelemetryConfig(
        interval_s=telemetry.number("interval_s", DEFAULTS.telemetry.interval_s, lo=0.1, hi=86400)
    )
    telemetry.done()

    http = top.section("http")
    http_cfg = HttpConfig(
        enabled=http.flag("enabled", DEFAULTS.http.enabled),
        host=http.text("host", DEFAULTS.http.host, max_len=253),
        port=http.integer("port", DEFAULTS.http.port, lo=0, hi=65535),
        max_body_bytes=http.integer("max_body_bytes", DEFAULTS.http.max_body_bytes, lo=1024, hi=1 << 30),
        max_connections=http.integer("max_connections", DEFAULTS.http.max_connections, lo=1, hi=1024),
        idle_timeout_s=http.number("idle_timeout_s", DEFAULTS.http.idle_timeout_s, lo=0.1, hi=3600),
        allow_remote=http.flag("allow_remote", DEFAULTS.http.allow_remote),
    )
    http.done()

    inference = top.section("inference")
    inference_cfg = InferenceOptions(
        intra_op_threads=inference.integer("intra_op_threads", DEFAULTS.inference.intra_op_threads, lo=0, hi=256),
        inter_op_threads=inference.integer("inter_op_threads", DEFAULTS.inference.inter_op_threads, lo=0, hi=64),
        allow_spinning=inference.flag("allow_spinning", DEFAULTS.inference.allow_spinning),
        cache_dir=inference.opt_path("cache_dir"),
        trt_fp16=inference.flag("trt_fp16", DEFAULTS.inference.trt_fp16),
        trt_workspace_bytes=inference.integer(
            "trt_workspace_bytes", DEFAULTS.inference.trt_workspace_bytes, lo=1 << 20, hi=1 << 40
        ),
        litert_interpreters=inference.integer(
            "litert_interpreters", DEFAULTS.inference.litert_interpreters, lo=1, hi=16
        ),
    )
    inference.done()

    log = top.section("log")
    log_cfg = LogConfig(
        format=log.choice("format", DEFAULTS.log.format, LOG_FORMATS),
        level=log.choice("level", DEFAULTS.log.level, LOG_LEVELS),
    )
    log.done()

    device_id = top.text("device_id", None, max_len=64)
    if not DEVICE_ID_PATTERN.match(device_id):
        raise ConfigError(
            f"device_id {device_id!r}: 1-64 characters of A-Z a-z 0-9 . _ -, starting alphanumeric", field="device_id"
        )
    config = AgentConfig(
        device_id=device_id,
        profile=top.text("profile", None, max_len=64),
        store_dir=top.path("store_dir", None),
        broker=broker_cfg,
        keys=keys_cfg,
        models=models_cfg,
        transfer=transfer_cfg,
        lifecycle=lifecycle_cfg,
        telemetry=telemetry_cfg,
        http=http_cfg,
        inference=inference_cfg,
        log=log_cfg,
        source=source,
    )
    top.done()
    return config


def _read_secret(path: Path, field_name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{field_name}: cannot read {path}: {exc.strerror or exc}", field=field_name) from exc
    return text.strip()


class _Section:
    """Typed reads from one TOML table; remembers which keys were read so leftovers are reported."""

    def __init__(self, data: Mapping[str, Any], prefix: str, base: Path) -> None:
        self._data = data
        self._prefix = prefix
        self._base = base
        self._seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if default is None:
                raise ConfigError(f"{self._name(key)} is required", field=self._name(key))
            return default
        return self._data[key]

    def _typed(self, key: str, value: Any, kind: type[T], what: str) -> T:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{self._name(key)} must be {what}, got {value!r}", field=self._name(key))
        return value

    def section(self, key: str) -> _Section:
        self._seen.add(key)
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{self._name(key)}] must be a table", field=self._name(key))
        return _Section(value, f"{self._name(key)}.", self._base)

    def text(self, key: str, default: str | None, *, max_len: int) -> str:
        value = self._typed(key, self._get(key, default), str, "a string")
        if not value or len(value) > max_len:
            raise ConfigError(f"{self._name(key)} must be 1-{max_len} characters", field=self._name(key))
        return value

    def opt_text(self, key: str, *, max_len: int) -> str | None:
        if key not in self._data:
            self._seen.add(key)
            return None
        return self.text(key, None, max_len=max_len)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default, max_len=32).lower()
        if value not in choices:
            raise ConfigError(f"{self._name(key)} must be one of {', '.join(choices)}", field=self._name(key))
        return value

    def flag(self, key: str, default: bool) -> bool:
        return self._typed(key, self._get(key, default), bool, "true or false")

    def integer(self, key: str, default: int | None, *, lo: int, hi: int) -> int:
        value = self._typed(key, self._get(key, default), int, "an integer")
        if not lo <= value <= hi:
            raise ConfigError(f"{self._name(key)}={value} is outside [{lo}, {hi}]", field=self._name(key))
        return value

    def number(self, key: str, default: float | None, *, lo: float, hi: float) -> float:
        value = self._get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        value = self._typed(key, value, float, "a number")
        if not lo <= value <= hi:
            raise ConfigError(f"{self._name(key)}={value} is outside [{lo}, {hi}]", field=self._name(key))
        return value

    def path(self, key: str, default: Path | None) -> Path:
        value = self._get(key, default)
        if isinstance(value, Path):
            return value if value.is_absolute() else self._base / value
        text = self._typed(key, value, str, "a path")
        if not text:
            raise ConfigError(f"{self._name(key)} must not be empty", field=self._name(key))
        p = Path(text).expanduser()
        return p if p.is_absolute() else self._base / p

    def opt_path(self, key: str) -> Path | None:
        if key not in self._data:
            self._seen.add(key)
            return None
        return self.path(key, None)

    def path_list(self, key: str, default: list[Path]) -> list[Path]:
        value = self._get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or len(value) > 16:
            raise ConfigError(f"{self._name(key)} must be a list of up to 16 paths", field=self._name(key))
        out: list[Path] = []
        for item in value:
            if isinstance(item, Path):
                out.append(item if item.is_absolute() else self._base / item)
            elif isinstance(item, str) and item:
                p = Path(item).expanduser()
                out.append(p if p.is_absolute() else self._base / p)
            else:
                raise ConfigError(f"{self._name(key)} must be a list of paths", field=self._name(key))
        return out

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            name = self._name(unknown[0])
            raise ConfigError(f"unknown setting {name!r} (check the spelling)", field=name)


def render_config(config: AgentConfig) -> str:
    """TOML text for a config (what ``edgefleet-agent init`` writes); paths as given, secrets omitted."""

    def q(value: object) -> str:
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    b = config.broker
    lines = [
        "# edgefleet-agent configuration (see `edgefleet-agent --help`)",
        f"device_id = {q(config.device_id)}",
        f"profile = {q(config.profile)}",
        f"store_dir = {q(config.store_dir)}",
        "",
        "[broker]",
        f"host = {q(b.host)}",
        f"port = {b.port}",
        f"tls = {'true' if b.tls else 'false'}",
    ]
    if b.ca_cert is not None:
        lines.append(f"ca_cert = {q(b.ca_cert)}")
    if b.client_cert is not None and b.client_key is not None:
        lines += [f"client_cert = {q(b.client_cert)}", f"client_key = {q(b.client_key)}"]
    if b.username is not None:
        lines.append(f"username = {q(b.username)}")
    if b.password_file is not None:
        lines.append(f"password_file = {q(b.password_file)}")
    lines += [
        f"keepalive_s = {b.keepalive_s}",
        f"reconnect_min_s = {b.reconnect_min_s}",
        f"reconnect_max_s = {b.reconnect_max_s}",
        "",
        "[keys]",
        f"device_key = {q(config.keys.device_key)}",
        "server_keys = [" + ", ".join(q(p) for p in config.keys.server_keys) + "]",
        "",
        "[models]",
        f"keep_versions = {config.models.keep_versions}",
        f"max_artifact_bytes = {config.models.max_artifact_bytes}",
        f"min_free_bytes = {config.models.min_free_bytes}",
        f"memory_budget_bytes = {config.models.memory_budget_bytes}",
        f"warm_standby = {'true' if config.models.warm_standby else 'false'}",
        "",
        "[transfer]",
        f"chunk_timeout_s = {config.transfer.chunk_timeout_s}",
        f"chunk_timeout_max_s = {config.transfer.chunk_timeout_max_s}",
        f"progress_interval_s = {config.transfer.progress_interval_s}",
        "",
        "[lifecycle]",
        f"restart_limit = {config.lifecycle.restart_limit}",
        f"probation_check_s = {config.lifecycle.probation_check_s}",
        f"clock_skew_s = {config.lifecycle.clock_skew_s}",
        f"latency_scale = {config.lifecycle.latency_scale}",
        f"benchmark_runs = {config.lifecycle.benchmark_runs}",
        f"benchmark_max_s = {config.lifecycle.benchmark_max_s}",
        f"benchmark_cpu_share = {config.lifecycle.benchmark_cpu_share}",
        f"probe_cpu_share = {config.lifecycle.probe_cpu_share}",
        f"probe_max_s = {config.lifecycle.probe_max_s}",
        f"probe_threads = {config.lifecycle.probe_threads}",
        f"probe_priority = {q(config.lifecycle.probe_priority)}",
        "",
        "[telemetry]",
        f"interval_s = {config.telemetry.interval_s}",
        "",
        "[http]",
        f"enabled = {'true' if config.http.enabled else 'false'}",
        f"host = {q(config.http.host)}",
        f"port = {config.http.port}",
        "",
        "[log]",
        f"format = {q(config.log.format)}",
        f"level = {q(config.log.level)}",
        "",
    ]
    return "\n".join(lines)
