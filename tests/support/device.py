"""A small device stand-in that speaks the real protocol (real broker, real envelope, real chunks).

It is what the control plane's integration tests drive before (and besides) the real agent:
it verifies signed desired states and commands with the server's public key, unwraps the data
key with its own X25519 key, downloads chunks from the shared stream or its own chunk topic,
checks both digests, and reports events and state the way CONTRACTS.md section 4 describes.
It does not run inference: a version listed in ``fail_versions`` fails its "health check"
and is rolled back, any other version commits after its probation.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.core.reassembly import MemorySink, Reassembly
from agent.errors import EdgeError
from agent.protocol.envelope import (
    ChunkOpener,
    TrustAnchor,
    decompress,
    open_command,
    open_desired,
    raw_public,
    unwrap_key,
)
from agent.protocol.messages import (
    ActiveModel,
    ChunkRequest,
    DesiredState,
    EnrollRequest,
    Event,
    ModelRef,
    StateReport,
    Telemetry,
    encode,
)
from agent.protocol.topics import Channel, device_down_filter, device_topic, parse_topic


@dataclass
class Download:
    desired: DesiredState
    opener: ChunkOpener
    reassembly: Reassembly
    sink: MemorySink
    started: float
    last_chunk: float


@dataclass
class DeviceState:
    last_seq: int = 0
    last_desired_sha: str | None = None
    active: tuple[str, int] | None = None
    active_state: str = "committed"
    kept: dict[int, bytes] = field(default_factory=dict)
    session: int = 0
    lifecycle: str = "idle"
    desired_expires_at: float | None = None


class SimDevice:
    def __init__(
        self,
        device_id: str,
        *,
        host: str,
        port: int,
        server_public_key: Ed25519PublicKey,
        profile: str = "rpi4",
        username: str | None = None,
        password: str | None = None,
        key: X25519PrivateKey | None = None,
        fail_versions: set[int] | None = None,
        retry_s: float = 2.0,
        ca_cert: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.host, self.port = host, port
        self.profile = profile
        self.username, self.password = username, password
        self.ca_cert = ca_cert
        self.key = key or X25519PrivateKey.generate()
        self.trust = TrustAnchor.of(server_public_key)
        self.fail_versions = set(fail_versions or ())
        self.retry_s = retry_s
        self.state = DeviceState()
        self.lock = threading.RLock()
        self.download: Download | None = None
        self.events: list[Event] = []
        self.received_chunks = 0
        #: drop every chunk once this many were stored (a link that died mid-transfer; tests reset it to None)
        self.ignore_chunks_after: int | None = None
        self.chunk_topics: set[str] = set()
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()
        self._timers: list[threading.Timer] = []
        self._retry_thread: threading.Thread | None = None
        self._closing = False

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(raw_public(self.key.public_key())).decode()

    # -- connection -----------------------------------------------------------------------------------

    def connect(self) -> SimDevice:
        with self.lock:
            self.state.session += 1
            session = self.state.session
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.ca_cert:
            c.tls_set(ca_certs=self.ca_cert, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        will = StateReport(device_id=self.device_id, online=False, session=session, ts=time.time())
        c.will_set(device_topic(self.device_id, Channel.STATE), encode(will), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c
        self._closing = False
        c.connect(self.host, self.port, keepalive=10)
        c.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError(f"{self.device_id} could not connect")
        if self._retry_thread is None or not self._retry_thread.is_alive():
            self._retry_thread = threading.Thread(target=self._retry_loop, daemon=True)
            self._retry_thread.start()
        return self

    def disconnect(self, *, graceful: bool = False) -> None:
        """Go offline. Not graceful (default): the broker publishes the Last Will, as on a power cut."""
        self._closing = True
        c, self.client = self.client, None
        self.connected.clear()
        for t in self._timers:
            t.cancel()
        if c is None:
            return
        if graceful:
            self._publish_state(c, online=False)
            c.disconnect()
        else:
            # close the socket without DISCONNECT so the broker sends the Will
            sock = c.socket()
            if sock is not None:
                sock.close()
        c.loop_stop()

    def close(self) -> None:
        """End of test: disconnect quickly (a clean DISCONNECT, no Will)."""
        self._closing = True
        c, self.client = self.client, None
        self.connected.clear()
        for t in self._timers:
            t.cancel()
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        client.subscribe(device_down_filter(self.device_id), qos=1)
        with self.lock:
            if self.download is not None and self.download.desired.artifact and self.download.desired.artifact.topic:
                client.subscribe(self.download.desired.artifact.topic, qos=1)
        self._publish_state(client, online=True)
        self.connected.set()
        with self.lock:
            if self.download is not None:
                self._request_missing("resume")

    # -- outgoing -------------------------------------------------------------------------------------

    def _publish(
        self, channel: Channel, payload: bytes, *, retain: bool = False, client: mqtt.Client | None = None
    ) -> None:
        c = client or self.client
        if c is not None:
            c.publish(device_topic(self.device_id, channel), payload, qos=1, retain=retain)

    def _publish_state(self, client: mqtt.Client | None = None, *, online: bool = True) -> None:
        with self.lock:
            s = self.state
            active = ActiveModel(s.active[0], s.active[1], s.active_state) if s.active else None
            report = StateReport(
                device_id=self.device_id, online=online, session=s.session, ts=time.time(), lifecycle=s.lifecycle,
                active=active, kept=tuple(sorted(s.kept)), last_seq=s.last_seq,
                desired_expires_at=s.desired_expires_at, profile=self.profile, arch="x86_64",
                agent_version="sim", public_key=self.public_key_b64,
            )
        self._publish(Channel.STATE, encode(report), retain=True, client=client)

    def event(self, kind: str, *, severity: str = "info", message: str = "", code: str | None = None,
              deployment_id: str | None = None, model: ModelRef | None = None, command_id: str | None = None,
              data: dict[str, Any] | None = None) -> None:
        ev = Event(device_id=self.device_id, ts=time.time(), event_id=uuid.uuid4().hex, kind=kind,
                   severity=severity, message=message, code=code, deployment_id=deployment_id, model=model,
                   command_id=command_id, data=data or {})
        self.events.append(ev)
        self._publish(Channel.EVENT, encode(ev))

    def send_telemetry(self, *, p95: float = 3.0, cpu: float = 12.5) -> None:
        with self.lock:
            active = ActiveModel(*self.state.active, self.state.active_state) if self.state.active else None
        t = Telemetry(device_id=self.device_id, ts=time.time(), window_s=10.0, cpu_percent=cpu,
                      memory_percent=40.0, rss_bytes=50_000_000, disk_free_bytes=10**9, requests=100, errors=0,
                      latency_ms={"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5}, temperature_c=51.0, model=active)
        self._publish(Channel.TELEMETRY, encode(t))

    def enroll(self) -> None:
        req = EnrollRequest(device_id=self.device_id, public_key=raw_public(self.key.public_key()),
                            profile=self.profile, ts=time.time(), agent_version="sim", arch="x86_64")
        self._publish(Channel.ENROLL, encode(req))

    # -- incoming -------------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = parse_topic(msg.topic)
        except EdgeError:
            return
        payload = bytes(msg.payload)
        with self.lock:
            if parsed.channel is Channel.DESIRED:
                self._on_desired(payload)
            elif parsed.channel is Channel.COMMAND:
                self._on_command(payload)
            elif parsed.channel in (Channel.CHUNK, Channel.ARTIFACT):
                self.chunk_topics.add(parsed.channel.value)
                self._on_chunk(payload)

    def _committed_version(self, model: str) -> int | None:
        s = self.state
        return s.active[1] if s.active and s.active[0] == model and s.active_state == "committed" else None

    def _on_desired(self, blob: bytes) -> None:
        if not blob:
            return  # withdrawn desired state
        sha = hashlib.sha256(blob).hexdigest()
        if sha == self.state.last_desired_sha:
            return
        try:
            desired = open_desired(blob, trust=self.trust, device_id=self.device_id, now=time.time(),
                                   last_seq=self.state.last_seq, committed_version=self._committed_version)
        except EdgeError as exc:
            self.state.last_desired_sha = sha
            self.event("desired.rejected", severity="error", message=exc.message, code=exc.code)
            return
        self.state.last_seq = desired.seq
        self.state.last_desired_sha = sha
        self.state.desired_expires_at = desired.expires_at
        self.event("desired.accepted", deployment_id=desired.deployment_id, model=desired.model)
        if desired.action == "pin":
            self._switch_to(desired.model.name, desired.model.version, deployment_id=desired.deployment_id)
            return
        if self.state.active == (desired.model.name, desired.model.version) and self.state.active_state == "committed":
            self._publish_state()
            return
        assert desired.artifact is not None and desired.key is not None
        try:
            data_key = unwrap_key(desired.key, self.key, artifact_id=desired.artifact.artifact_id,
                                  device_id=self.device_id)
        except EdgeError as exc:
            self.event("lifecycle.failed", severity="error", message=exc.message, code=exc.code,
                       deployment_id=desired.deployment_id, model=desired.model)
            return
        info = desired.artifact
        sink = MemorySink(info.compressed_size)
        self.download = Download(desired, ChunkOpener(data_key, info), Reassembly(
            artifact_id=info.artifact_id, chunk_count=info.chunk_count, chunk_size=info.chunk_size,
            total_size=info.compressed_size, sha256=info.compressed_sha256, max_bytes=1 << 30), sink,
            time.time(), time.time())
        self.state.lifecycle = "downloading"
        if info.topic and self.client is not None:
            self.client.subscribe(info.topic, qos=1)
        self.event("download.started", deployment_id=desired.deployment_id, model=desired.model,
                   data={"received": 0, "total": info.chunk_count})
        self._publish_state()
        self._request_missing("initial")

    def _request_missing(self, reason: str) -> None:
        d = self.download
        if d is None or d.desired.artifact is None:
            return
        ranges = d.reassembly.missing_ranges()
        if not ranges:
            return
        req = ChunkRequest(device_id=self.device_id, artifact_id=d.desired.artifact.artifact_id, ranges=ranges,
                           ts=time.time(), reason=reason)
        self._publish(Channel.CHUNK_REQUEST, encode(req))

    def _retry_loop(self) -> None:
        while not self._closing:
            time.sleep(0.25)
            with self.lock:
                d = self.download
                if d is not None and self.connected.is_set() and time.time() - d.last_chunk > self.retry_s:
                    d.last_chunk = time.time()
                    self._request_missing("retry")

    def _on_chunk(self, wire: bytes) -> None:
        d = self.download
        if d is None:
            return
        if self.ignore_chunks_after is not None and self.received_chunks >= self.ignore_chunks_after:
            return
        try:
            index, plain = d.opener.open(wire)
            d.reassembly.add(index, plain, d.sink)
        except EdgeError as exc:
            self.event(f"error.{exc.code}", severity="warning", message=exc.message)
            return
        self.received_chunks += 1
        d.last_chunk = time.time()
        if not d.reassembly.complete:
            return
        desired, info = d.desired, d.desired.artifact
        assert info is not None
        self.download = None
        if self.client is not None and info.topic:
            self.client.unsubscribe(info.topic)
        try:
            d.reassembly.finish(d.sink)
            model = decompress(bytes(d.sink.buffer), info.compression, expected_size=info.size)
            if hashlib.sha256(model).hexdigest() != info.sha256:
                raise EdgeError("model digest mismatch")
        except EdgeError as exc:
            self.state.lifecycle = "idle"
            self.event("lifecycle.failed", severity="error", message=exc.message, code=exc.code,
                       deployment_id=desired.deployment_id, model=desired.model)
            self._publish_state()
            return
        ref, dep = desired.model, desired.deployment_id
        self.event("download.completed", deployment_id=dep, model=ref,
                   data={"received": info.chunk_count, "total": info.chunk_count})
        for step in ("verifying", "staged", "warming"):
            self.state.lifecycle = step
            self.event(f"lifecycle.{step}", deployment_id=dep, model=ref)
        if ref.version in self.fail_versions:
            previous = self.state.active
            self.state.lifecycle = "idle"
            self.event("lifecycle.rolled_back", severity="error", message="health check failed: latency",
                       deployment_id=dep, model=ref,
                       data={"reason": "p95 latency 250 ms over the 50 ms budget", "check": "latency",
                             "restored": {"name": previous[0], "version": previous[1]} if previous else None,
                             "phase": "warming"})
            self._publish_state()
            return
        self.state.kept[ref.version] = model
        previous_active = self.state.active
        self.state.active = (ref.name, ref.version)
        self.state.active_state = "probation"
        self.state.lifecycle = "probation"
        self.event("lifecycle.probation", deployment_id=dep, model=ref)
        self._publish_state()
        probation = desired.health.probation_s if desired.health else 0.0
        t = threading.Timer(min(probation, 5.0), self._commit, args=(ref, dep, previous_active))
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _commit(self, ref: ModelRef, deployment_id: str | None, previous: tuple[str, int] | None) -> None:
        with self.lock:
            if self.state.active != (ref.name, ref.version) or self.state.active_state != "probation":
                return
            self.state.active_state = "committed"
            self.state.lifecycle = "idle"
            self.event("lifecycle.committed", deployment_id=deployment_id, model=ref)
            self._publish_state()

    def _switch_to(self, model: str, version: int, *, deployment_id: str | None = None,
                   command_id: str | None = None) -> bool:
        if version not in self.state.kept:
            self.event("error.version_not_kept", severity="error", code="version_not_kept",
                       message=f"{model} v{version} is not kept", deployment_id=deployment_id,
                       command_id=command_id)
            return False
        self.download = None
        self.state.active = (model, version)
        self.state.active_state = "committed"
        self.state.lifecycle = "idle"
        self._publish_state()
        return True

    def _on_command(self, blob: bytes) -> None:
        try:
            cmd = open_command(blob, trust=self.trust, device_id=self.device_id, now=time.time(),
                               last_seq=self.state.last_seq)
        except EdgeError as exc:
            self.event(f"error.{exc.code}", severity="error", message=exc.message, code=exc.code)
            return
        self.state.last_seq = cmd.seq
        ok, message = True, ""
        if cmd.action == "rollback":
            model = cmd.model or (self.state.active[0] if self.state.active else "")
            version = cmd.version
            if version is None:
                earlier = [v for v in self.state.kept if self.state.active and v < self.state.active[1]]
                version = max(earlier) if earlier else None
            ok = version is not None and self._switch_to(model, version, command_id=cmd.command_id)
            message = "rolled back" if ok else "version not kept"
            if ok:
                self.event("lifecycle.rolled_back", severity="warning", model=ModelRef(model, version or 0),
                           data={"reason": "operator", "check": None, "phase": "committed",
                                 "restored": {"name": model, "version": version}})
        active = {"name": self.state.active[0], "version": self.state.active[1]} if self.state.active else None
        self.event("command.result", command_id=cmd.command_id, message=message,
                   data={"ok": ok, "action": cmd.action, "active": active, "message": message})

    # -- helpers for tests ----------------------------------------------------------------------------

    def seed(self, model: str, version: int, content: bytes = b"seed") -> None:
        """Start with ``model`` ``version`` committed and kept (a device already in service)."""
        with self.lock:
            self.state.kept[version] = content
            self.state.active = (model, version)
            self.state.active_state = "committed"

    @property
    def active(self) -> tuple[str, int] | None:
        with self.lock:
            return self.state.active

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.device_id}: condition not met within {timeout}s (state {self.state})")
