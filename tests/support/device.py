"""The device the control plane's integration tests drive: the real simulated device on its own MQTT client.

``DeviceUnderTest`` runs ``server.simulator.device.SimDevice`` (the agent's own core: intake, trust
state, lifecycle, reassembly, codec; memory for the store, a stand-in for inference) on a paho
client with its own network thread and a timer thread, under one lock. What it adds are test hooks:
``seed`` (start with a version committed), ``fail_versions`` (their warm-up health check fails),
``ignore_chunks_after`` (a link that dies mid-transfer), ``events`` (every event it published),
``chunk_topics``, ``send_telemetry``, ``enroll``, ``disconnect`` (with or without the Last Will) and
``wait_for``.
"""

from __future__ import annotations

import base64
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.journal import State
from agent.errors import EdgeError
from agent.protocol.envelope import TrustAnchor, raw_public
from agent.protocol.messages import ActiveModel, EnrollRequest, Event, ModelRef, Telemetry, encode
from agent.protocol.topics import Channel, device_topic, parse_topic
from server.simulator.device import SimDevice, SimSettings, SimShared

TICK_S = 0.05


class _Recording(SimDevice):
    """The simulated device, keeping what it emitted for the test to read."""

    def __init__(self, *args: Any, events: list[Event], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.emitted = events

    def _emit(self, event: Event) -> None:
        self.emitted.append(event)
        super()._emit(event)


@dataclass
class DeviceState:
    """A snapshot of what the device would report (``desired_expires_at`` may be set: it is the trust state's)."""

    owner: DeviceUnderTest

    @property
    def last_seq(self) -> int:
        return self.owner.sim.machine.record.last_seq

    @property
    def session(self) -> int:
        return self.owner.sim.session

    @property
    def lifecycle(self) -> str:
        return self.owner.sim.lifecycle

    @property
    def active_state(self) -> str:
        sim = self.owner.sim
        on_probation = sim.machine.state is State.PROBATION and sim.active == sim.machine.record.target
        return "probation" if on_probation else "committed"

    @property
    def desired_expires_at(self) -> float | None:
        return self.owner.sim.trusted.desired_expires_at

    @desired_expires_at.setter
    def desired_expires_at(self, value: float | None) -> None:
        self.owner.sim.trusted.desired_expires_at = value


class DeviceUnderTest:
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
        self.events: list[Event] = []
        settings = SimSettings(profile=profile, fail_versions=frozenset(fail_versions or ()), telemetry_s=0.0,
                               chunk_timeout_s=retry_s, probation_check_s=0.1)
        self.sim = _Recording(device_id, key=self.key, shared=SimShared(TrustAnchor.of(server_public_key), settings),
                              events=self.events)
        self.lock = threading.RLock()
        #: drop every chunk once this many were stored (a link that died mid-transfer; tests reset it to None)
        self.ignore_chunks_after: int | None = None
        self.chunk_topics: set[str] = set()
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()
        self._ticker: threading.Thread | None = None
        self._closing = False

    # -- what tests read ------------------------------------------------------------------------------

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(raw_public(self.key.public_key())).decode()

    @property
    def state(self) -> DeviceState:
        return DeviceState(self)

    @property
    def active(self) -> tuple[str, int] | None:
        with self.lock:
            ref = self.sim.active
            return (ref.name, ref.version) if ref is not None else None

    @property
    def received_chunks(self) -> int:
        return self.sim.counters.chunks

    def seed(self, model: str, version: int) -> None:
        """Start with ``model`` ``version`` committed and kept (a device already in service)."""
        with self.lock:
            self.sim.seed(ModelRef(model, version))

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        """Until ``predicate(self)`` holds, as long as the device moves (lifecycle, active version, chunks,
        events, messages) at least every ``max(timeout, 60)`` s: a loaded machine is slow, not stuck
        (tests/support/waiting.py); 300 s at most."""
        from tests.support.waiting import wait_progress

        def done() -> bool:
            with self.lock:
                return bool(predicate(self))

        def progress() -> tuple[Any, ...]:
            with self.lock:
                return (self.sim.lifecycle, self.sim.active, self.sim.counters.chunks, len(self.events),
                        self.connected.is_set())

        try:
            wait_progress(done, what=f"{self.device_id}: condition", progress=progress,
                          describe=lambda: f"lifecycle {self.sim.lifecycle}, active {self.sim.active}",
                          stall_s=max(timeout, 60.0), cap_s=max(timeout, 300.0), interval_s=0.05)
        except TimeoutError as exc:
            raise TimeoutError(str(exc)) from None

    # -- connection -----------------------------------------------------------------------------------

    def connect(self) -> DeviceUnderTest:
        with self.lock:
            self.sim.session += 1
            topic, will = self.sim.will(self.sim.session)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.ca_cert:
            c.tls_set(ca_certs=self.ca_cert, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(topic, will, qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c
        self._closing = False
        c.connect(self.host, self.port, keepalive=10)
        c.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError(f"{self.device_id} could not connect")
        if self._ticker is None or not self._ticker.is_alive():
            self._ticker = threading.Thread(target=self._tick_loop, name=f"tick-{self.device_id}", daemon=True)
            self._ticker.start()
        return self

    def disconnect(self, *, graceful: bool = False) -> None:
        """Go offline. Not graceful (default): the broker publishes the Last Will, as on a power cut."""
        self._closing = True
        c, self.client = self.client, None
        self.connected.clear()
        if c is None:
            return
        if graceful:
            with self.lock:
                topic, farewell = self.sim.farewell()
            c.publish(topic, farewell, qos=1, retain=True)
            c.disconnect()
        else:
            sock = c.socket()  # close the socket without DISCONNECT so the broker sends the Will
            if sock is not None:
                sock.close()
        c.loop_stop()
        self._offline()

    def close(self) -> None:
        """End of test: disconnect quickly (a clean DISCONNECT, no Will)."""
        self._closing = True
        c, self.client = self.client, None
        self.connected.clear()
        if c is not None:
            c.disconnect()
            c.loop_stop()
        self._offline()
        if self._ticker is not None:
            self._ticker.join(timeout=2)

    def _offline(self) -> None:
        with self.lock:
            self.sim.on_disconnected()
            self.sim.client = None

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        with self.lock:
            self.sim.client = client
            self.sim.on_connected(0.0)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            channel = parse_topic(msg.topic).channel
        except EdgeError:
            return
        with self.lock:
            if channel in (Channel.CHUNK, Channel.ARTIFACT):
                self.chunk_topics.add(channel.value)
                if self.ignore_chunks_after is not None and self.received_chunks >= self.ignore_chunks_after:
                    return
            self.sim.on_message(msg.topic, bytes(msg.payload))

    def _tick_loop(self) -> None:
        while not self._closing:
            time.sleep(TICK_S)
            with self.lock:
                self.sim.tick(time.monotonic())

    # -- test hooks that publish ----------------------------------------------------------------------

    def _publish(self, channel: Channel, payload: bytes) -> None:
        c = self.client
        if c is not None:
            c.publish(device_topic(self.device_id, channel), payload, qos=1)

    def event(self, kind: str, **fields: Any) -> None:
        with self.lock:
            self.sim._event(kind, **fields)

    def send_telemetry(self, *, p95: float = 3.0, cpu: float = 12.5) -> None:
        with self.lock:
            ref = self.sim.active
            active = ActiveModel(ref.name, ref.version, self.state.active_state) if ref is not None else None
        t = Telemetry(device_id=self.device_id, ts=time.time(), window_s=10.0, cpu_percent=cpu,
                      memory_percent=40.0, rss_bytes=50_000_000, disk_free_bytes=10**9, requests=100, errors=0,
                      latency_ms={"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5}, temperature_c=51.0, model=active)
        self._publish(Channel.TELEMETRY, encode(t))

    def enroll(self) -> None:
        req = EnrollRequest(device_id=self.device_id, public_key=raw_public(self.key.public_key()),
                            profile=self.profile, ts=time.time(), agent_version="sim", arch="x86_64")
        self._publish(Channel.ENROLL, encode(req))
