"""A small stand-in for the edgefleet server, for agent tests: real MQTT, real crypto, no registry.

It plays the server's half of the contract with the real ``agent.protocol`` functions: it signs
desired states and commands with an Ed25519 key, wraps each artifact's data key to the device's
X25519 key, and serves chunks when a device asks (unicast on ``down/chunk/{id}`` or, for an
artifact sealed with a shared topic, on ``art/{id}``). It records every event, state report and
telemetry message the devices send, and lets a test wait for them.

Knobs a test turns: ``chunk_delay_s`` (pacing between chunk publishes: makes a download long
enough to interrupt, without sleeping in product code), ``serve_chunks`` (False: the broker
carries no chunks at all), ``tamper`` (a function that may corrupt a chunk before it is sent).
"""

from __future__ import annotations

import itertools
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.envelope import SealedArtifact, seal_artifact, seal_command, seal_desired, wrap_key
from agent.protocol.measurement import Measurement
from agent.protocol.messages import (
    ChunkRequest,
    Command,
    DesiredState,
    EnrollRequest,
    Event,
    HealthSpec,
    ModelRef,
    RuntimeSpec,
    StateReport,
    Telemetry,
    decode_up,
)
from agent.protocol.topics import ALL_DEVICES_UP_FILTER, Channel, device_topic, parse_topic

WEEK = 7 * 24 * 3600.0


@dataclass
class DeviceLog:
    """Everything one device sent, in arrival order."""

    public_key: X25519PublicKey | None = None
    seq: int = 0
    events: list[Event] = field(default_factory=list)
    states: list[StateReport] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)
    chunk_requests: list[ChunkRequest] = field(default_factory=list)
    enrolls: int = 0
    enroll_requests: list[EnrollRequest] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)


class FleetServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_cert: Path | None = None,
    ) -> None:
        self.signing_key = Ed25519PrivateKey.generate()
        self.devices: dict[str, DeviceLog] = {}
        self.artifacts: dict[str, SealedArtifact] = {}
        self.chunk_delay_s = 0.0
        self.serve_chunks = True
        #: the chunk loop is publishing (False once ``serve_chunks = False`` has stopped it: ``wait_for`` it)
        self.streaming = False
        #: publish no more chunks once ``chunks_sent`` reaches this (None: no limit): holds a transfer mid-way
        self.chunk_limit: int | None = None
        self.tamper: Callable[[int, bytes], bytes] | None = None
        self.chunks_sent = 0
        self._cond = threading.Condition()
        self._work: queue.Queue[tuple[str, str, tuple[tuple[int, int], ...]] | None] = queue.Queue()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-server-{uuid.uuid4().hex[:8]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_cert is not None:
            self.client.tls_set(ca_certs=str(ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(64)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("the test server could not connect to the broker")
        self._worker = threading.Thread(target=self._serve, name="chunk-server", daemon=True)
        self._worker.start()

    # -- keys and enrollment ------------------------------------------------------------------------------

    def write_public_key(self, path: Path) -> Path:
        pem = self.signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.write_bytes(pem)
        return path

    def enroll(self, device_id: str, public_key: X25519PublicKey) -> None:
        with self._cond:
            self.devices.setdefault(device_id, DeviceLog()).public_key = public_key

    def log(self, device_id: str) -> DeviceLog:
        with self._cond:
            return self.devices.setdefault(device_id, DeviceLog())

    def next_seq(self, device_id: str) -> int:
        with self._cond:
            d = self.devices.setdefault(device_id, DeviceLog())
            d.seq += 1
            return d.seq

    # -- server -> device ----------------------------------------------------------------------------------

    def seal(
        self, model: bytes, *, chunk_size: int = 16 * 1024, compression: str = "lzma", shared: bool = False
    ) -> SealedArtifact:
        artifact = seal_artifact(model, chunk_size=chunk_size, compression=compression, shared_topic=shared)
        self.artifacts[artifact.info.artifact_id] = artifact
        return artifact

    def desired_deploy(
        self,
        device_id: str,
        artifact: SealedArtifact,
        ref: ModelRef,
        *,
        runtime: RuntimeSpec,
        health: HealthSpec,
        seq: int | None = None,
        expires_in: float = WEEK,
        deployment_id: str | None = None,
        variant: str | None = None,
    ) -> DesiredState:
        public_key = self.log(device_id).public_key
        assert public_key is not None, f"{device_id} is not enrolled"
        now = time.time()
        return DesiredState(
            device_id=device_id,
            seq=seq if seq is not None else self.next_seq(device_id),
            issued_at=now,
            expires_at=now + expires_in,
            action="deploy",
            model=ref,
            deployment_id=deployment_id or f"dep-{uuid.uuid4().hex[:8]}",
            artifact=artifact.info,
            key=wrap_key(artifact.data_key, public_key, artifact_id=artifact.info.artifact_id, device_id=device_id),
            runtime=runtime,
            health=health,
            variant=variant,
        )

    def deploy(
        self,
        device_id: str,
        model: bytes,
        ref: ModelRef,
        *,
        runtime: RuntimeSpec,
        health: HealthSpec,
        shared: bool = False,
        chunk_size: int = 16 * 1024,
        compression: str = "lzma",
        **kwargs: object,
    ) -> DesiredState:
        artifact = self.seal(model, chunk_size=chunk_size, compression=compression, shared=shared)
        desired = self.desired_deploy(device_id, artifact, ref, runtime=runtime, health=health, **kwargs)  # type: ignore[arg-type]
        self.publish_desired(desired)
        return desired

    def pin(self, device_id: str, ref: ModelRef, *, deployment_id: str | None = None) -> DesiredState:
        now = time.time()
        desired = DesiredState(
            device_id=device_id,
            seq=self.next_seq(device_id),
            issued_at=now,
            expires_at=now + WEEK,
            action="pin",
            model=ref,
            deployment_id=deployment_id,
        )
        self.publish_desired(desired)
        return desired

    def publish_desired(self, desired: DesiredState, *, signing_key: Ed25519PrivateKey | None = None) -> bytes:
        blob = seal_desired(desired, signing_key or self.signing_key)
        self.publish_raw(device_topic(desired.device_id, Channel.DESIRED), blob, retain=True)
        return blob

    def command(
        self,
        device_id: str,
        action: str,
        *,
        model: str | None = None,
        version: int | None = None,
        seq: int | None = None,
        expires_in: float = 300.0,
    ) -> str:
        now = time.time()
        command_id = uuid.uuid4().hex[:12]
        command = Command(
            device_id=device_id,
            seq=seq if seq is not None else self.next_seq(device_id),
            issued_at=now,
            expires_at=now + expires_in,
            command_id=command_id,
            action=action,
            model=model,
            version=version,
        )
        self.publish_raw(device_topic(device_id, Channel.COMMAND), seal_command(command, self.signing_key))
        return command_id

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def clear_desired(self, device_id: str) -> None:
        self.publish_raw(device_topic(device_id, Channel.DESIRED), b"", retain=True)

    # -- device -> server -------------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        client.subscribe(ALL_DEVICES_UP_FILTER, qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = parse_topic(msg.topic)
            kind = {
                Channel.EVENT: "event",
                Channel.STATE: "state",
                Channel.TELEMETRY: "telemetry",
                Channel.CHUNK_REQUEST: "chunk_request",
                Channel.ENROLL: "enroll",
                Channel.MEASUREMENT: "measurement",
            }[parsed.channel]
            message = decode_up(bytes(msg.payload), kind)
        except Exception:
            return
        assert parsed.device_id is not None
        with self._cond:
            d = self.devices.setdefault(parsed.device_id, DeviceLog())
            if isinstance(message, Event):
                d.events.append(message)
            elif isinstance(message, StateReport):
                d.states.append(message)
            elif isinstance(message, Telemetry):
                d.telemetry.append(message)
            elif isinstance(message, ChunkRequest):
                d.chunk_requests.append(message)
                self._work.put((parsed.device_id, message.artifact_id, message.ranges))
            elif isinstance(message, Measurement):
                d.measurements.append(message)
            elif isinstance(message, EnrollRequest):
                d.enrolls += 1
                d.enroll_requests.append(message)
            self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            device_id, artifact_id, ranges = item
            artifact = self.artifacts.get(artifact_id)
            if artifact is None or not self.serve_chunks:
                continue
            topic = artifact.info.topic or device_topic(device_id, Channel.CHUNK, artifact_id)
            self._set_streaming(True)
            for start, end in ranges:
                for index in range(start, min(end, len(artifact.chunks))):
                    if not self.serve_chunks or (self.chunk_limit is not None and self.chunks_sent >= self.chunk_limit):
                        break
                    chunk = artifact.chunks[index]
                    if self.tamper is not None:
                        chunk = self.tamper(index, chunk)
                    self.client.publish(topic, chunk, qos=1)
                    self.chunks_sent += 1
                    if self.chunk_delay_s:
                        time.sleep(self.chunk_delay_s)
            self._set_streaming(False)

    def _set_streaming(self, on: bool) -> None:
        with self._cond:
            self.streaming = on
            self._cond.notify_all()

    # -- waiting ------------------------------------------------------------------------------------------------

    # Waits on real agent processes: ``timeout`` is how long the device (for ``wait_for``: any device) may
    # send nothing new (an event, a state report, a chunk request) before the wait fails, not a budget for
    # the whole wait; a loaded machine makes an agent slow, not silent (issue 11). ``5 * timeout`` (at
    # least 300 s) caps a wait that keeps moving.

    def _activity(self, device_id: str | None) -> int:
        logs = [self.log(device_id)] if device_id is not None else list(self.devices.values())
        return sum(len(d.events) + len(d.states) + len(d.chunk_requests) for d in logs)

    def _wait_moving(self, device_id: str | None, done: Callable[[], bool], stall_s: float) -> bool:
        """Under ``self._cond``: until ``done()`` (True), or False after ``stall_s`` without activity."""
        start = moved = time.monotonic()
        marker = self._activity(device_id)
        while not done():
            now = time.monotonic()
            current = self._activity(device_id)
            if current != marker:
                marker, moved = current, now
            if now - moved >= stall_s or now - start >= max(300.0, 5 * stall_s):
                return False
            self._cond.wait(timeout=min(0.5, stall_s - (now - moved)))
        return True

    def wait_event(
        self,
        device_id: str,
        kind: str | Callable[[Event], bool],
        *,
        timeout: float = 30.0,
        after: int = 0,
    ) -> Event:
        """The first event (from index ``after``) of that kind or matching the predicate."""
        match = (lambda e: e.kind == kind) if isinstance(kind, str) else kind
        with self._cond:
            ok = self._wait_moving(device_id, lambda: any(match(e) for e in self.log(device_id).events[after:]),
                                   timeout)
            if not ok:
                seen = [e.kind for e in self.log(device_id).events[after:]]
                raise TimeoutError(f"{device_id}: no {kind!r} event, and nothing new from it for {timeout}s "
                                   f"(saw {seen})")
            return next(e for e in self.log(device_id).events[after:] if match(e))

    def wait_state(
        self, device_id: str, predicate: Callable[[StateReport], bool], *, timeout: float = 30.0
    ) -> StateReport:
        """Wait until the *latest* state report satisfies ``predicate``."""
        with self._cond:
            ok = self._wait_moving(
                device_id, lambda: bool(self.log(device_id).states) and predicate(self.log(device_id).states[-1]),
                timeout,
            )
            states = self.log(device_id).states
            if not ok:
                last = states[-1] if states else None
                raise TimeoutError(f"{device_id}: state not reached, and nothing new from it for {timeout}s "
                                   f"(last: {last})")
            return states[-1]

    def wait_for(self, condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._wait_moving(None, condition, timeout):
                raise TimeoutError(f"condition not met, and no device sent anything new for {timeout}s")

    def event_count(self, device_id: str) -> int:
        with self._cond:
            return len(self.log(device_id).events)

    def kinds(self, device_id: str, after: int = 0) -> list[str]:
        with self._cond:
            return [e.kind for e in self.log(device_id).events[after:]]

    def close(self) -> None:
        self._work.put(None)
        self.client.disconnect()
        self.client.loop_stop()


_ids = itertools.count(1)


def unique_device_id(prefix: str = "dev") -> str:
    return f"{prefix}-{next(_ids)}-{uuid.uuid4().hex[:6]}"
