"""Many simulated devices on a few threads: each thread multiplexes its devices' MQTT sockets.

Theory of operation
    ``SimFleet`` splits the devices over ``loops`` shard threads (a handful, never one per device).
    A shard owns a ``selectors`` selector and its devices' paho clients, which run without paho's
    own thread: the shard registers each client's socket when paho opens it, asks for write
    readiness only while paho has bytes queued (paho's socket callbacks), and calls
    ``loop_read``/``loop_write`` when the selector says so. paho parses MQTT and calls the
    device's handlers in the shard thread, so a device's state is only ever touched by its shard:
    no locks. Every ``TICK_S`` the shard runs the devices' timers, every second paho's keepalive.

    Connections are opened a batch at a time (so CONNACKs do not pile up behind a thousand
    blocking connects), with a persistent session (clean_session=0), a retained Last Will on
    ``up/state`` and a birth report, as the agent does. A lost connection is retried with
    back-off. ``stop`` leaves a retained offline report for every device and disconnects cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import random
import selectors
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.envelope import TrustAnchor
from agent.protocol.events import EventKind
from agent.protocol.messages import ModelRef
from agent.protocol.shards import pick
from server.simulator.device import SimDevice, SimSettings, SimShared

log = logging.getLogger("edgefleet.simulator")

TICK_S = 0.2
MISC_S = 1.0
CONNECT_BATCH = 25


def device_key(seed: str, device_id: str) -> X25519PrivateKey:
    """The device's X25519 key, derived from a seed so a restarted simulation keeps its enrolled keys."""
    raw = hashlib.sha256(f"edgefleet-sim/{seed}/{device_id}".encode()).digest()
    return X25519PrivateKey.from_private_bytes(raw)


def device_ids(count: int, prefix: str = "sim") -> list[str]:
    width = max(4, len(str(count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


@dataclass(frozen=True)
class BrokerTarget:
    """Where the devices connect and how they log in.

    ``credentials`` maps device id -> MQTT password: each device then logs in as its own id (what the
    ACL of ``edgefleet broker config`` expects); ``username``/``password`` is one login for all (test
    brokers). With ``tls``, the broker's certificate is checked against ``ca_cert`` (system CAs when
    unset) and its name against ``host`` unless ``check_hostname`` is off.
    """

    host: str
    port: int
    tls: bool = False
    ca_cert: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 60
    credentials: Mapping[str, str] | None = field(default=None, repr=False)
    check_hostname: bool = True

    def login(self, device_id: str) -> tuple[str, str | None] | None:
        if self.credentials is not None:
            return device_id, self.credentials.get(device_id)
        if self.username:
            return self.username, self.password
        return None


#: CONNACK reasons that retrying will not fix (the operator must change credentials or the ACL)
_FATAL_CONNACK = ("not authorized", "bad user name or password")


@dataclass(frozen=True)
class FleetSnapshot:
    """A moment of the fleet as the status view shows it (racy reads of plain attributes; fine for display)."""

    devices: int
    online: int
    lifecycle: dict[str, int]
    active: dict[str, int]
    committed: dict[str, int]
    chunks: int
    duplicate_chunks: int
    published_bytes: int
    retries: int

    def committed_on(self, ref: ModelRef) -> int:
        """Devices idle with ``ref`` committed (the update is over and it stuck)."""
        return self.committed.get(_ref_key(ref), 0)


def _ref_key(ref: ModelRef | None) -> str:
    return "-" if ref is None else f"{ref.name} v{ref.version}"


class _Shard(threading.Thread):
    def __init__(self, index: int, devices: list[SimDevice], brokers: Sequence[BrokerTarget],
                 stop: threading.Event) -> None:
        super().__init__(name=f"edgefleet-sim-{index}", daemon=True)
        self.devices = devices
        #: one broker, or the shard brokers in order: each device uses its own (agent.protocol.shards)
        self.brokers = brokers
        self._stop_flag = stop
        self._selector = selectors.DefaultSelector()
        self._to_connect: deque[SimDevice] = deque(devices)
        self._retries: list[tuple[float, int, SimDevice]] = []
        self._backoff: dict[str, float] = {}
        self._seq = 0
        self.connected_once = threading.Event()
        #: device id -> why the broker or TLS refused it in a way retrying will not fix (read by SimFleet)
        self.refused: dict[str, str] = {}
        self.error: BaseException | None = None

    # -- paho wiring --------------------------------------------------------------------------------------

    def _client(self, dev: SimDevice) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev.device_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        b = self.broker_of(dev)
        login = b.login(dev.device_id)
        if login is not None:
            c.username_pw_set(*login)
        if b.tls:
            c.tls_set(ca_certs=b.ca_cert, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if not b.check_hostname:
                c.tls_insecure_set(True)
        c.max_inflight_messages_set(50)
        sel = self._selector

        def on_open(client: mqtt.Client, userdata: object, sock: object) -> None:
            sel.register(sock, selectors.EVENT_READ, dev)  # type: ignore[arg-type]

        def on_close(client: mqtt.Client, userdata: object, sock: object) -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)  # type: ignore[arg-type]


        def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            if getattr(rc, "is_failure", False):
                log.warning("%s: broker refused the connection: %s", dev.device_id, rc)
                if str(rc).lower() in _FATAL_CONNACK:
                    self.refused[dev.device_id] = f"broker refused the login: {rc}"
                return
            self.refused.pop(dev.device_id, None)
            self._backoff.pop(dev.device_id, None)
            dev.on_connected(random.random())  # noqa: S311 - spreading telemetry, not security
            self.connected_once.set()

        def on_disconnect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            dev.on_disconnected()
            if not self._stop_flag.is_set():
                self._schedule_retry(dev)

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            dev.on_message(msg.topic, bytes(msg.payload))

        c.on_socket_open = on_open
        c.on_socket_close = on_close
        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        return c

    def broker_of(self, dev: SimDevice) -> BrokerTarget:
        return pick(dev.device_id, self.brokers)

    def _connect(self, dev: SimDevice) -> None:
        if dev.client is None:
            dev.client = self._client(dev)
        dev.session += 1
        topic, payload = dev.will(dev.session)
        dev.client.will_set(topic, payload, qos=1, retain=True)
        try:
            if dev.counters.connects == 0 and dev.session == 1:
                b = self.broker_of(dev)
                dev.client.connect(b.host, b.port, keepalive=b.keepalive_s)
            else:
                dev.client.reconnect()
        except ssl.SSLCertVerificationError as exc:
            self.refused[dev.device_id] = f"TLS: {exc.verify_message or exc}"
            log.debug("%s: connect failed: %s", dev.device_id, exc)
            self._schedule_retry(dev)
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: connect failed: %s", dev.device_id, exc)
            self._schedule_retry(dev)

    def _schedule_retry(self, dev: SimDevice) -> None:
        delay = min(30.0, self._backoff.get(dev.device_id, 0.5) * 2)
        self._backoff[dev.device_id] = delay
        self._seq += 1
        heapq.heappush(self._retries, (time.monotonic() + delay * (0.5 + random.random()), self._seq, dev))  # noqa: S311

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by SimFleet.check(); the shard's devices go quiet
            log.exception("simulator shard failed")
            self.error = exc
        finally:
            self._shutdown()

    def _loop(self) -> None:
        next_tick = next_misc = time.monotonic()
        while not self._stop_flag.is_set():
            for _ in range(min(CONNECT_BATCH, len(self._to_connect))):
                self._connect(self._to_connect.popleft())
            events = self._selector.select(0.0 if self._to_connect else TICK_S / 2)
            for key, mask in events:
                dev: SimDevice = key.data
                client = dev.client
                if client is None:
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    # TLS: records already decrypted into the SSL buffer do not wake the selector again
                    sock = client.socket()
                    while isinstance(sock, ssl.SSLSocket) and sock.pending() and client.socket() is sock:
                        client.loop_read()
                self._flush(dev, key.fileobj)
            now = time.monotonic()
            while self._retries and self._retries[0][0] <= now:
                _, _, dev = heapq.heappop(self._retries)
                self._connect(dev)
            if now >= next_tick:
                next_tick = now + TICK_S
                for dev in self.devices:
                    dev.tick(now)
                    if dev.client is not None and dev.client.want_write():
                        self._flush(dev, dev.client.socket())
            if now >= next_misc:
                next_misc = now + MISC_S
                for dev in self.devices:
                    if dev.client is not None:
                        dev.client.loop_misc()

    def _flush(self, dev: SimDevice, sock: object) -> None:
        """Write what paho queued (acks, reports) right away; wait for writability only when the socket is full.

        paho writes by itself outside its callbacks; inside them (the PUBACK of a chunk, a report made
        while handling a message) it only queues, so the shard writes after each read. The selector's
        interest changes only when a backlog starts or ends, not twice per message.
        """
        client = dev.client
        if client is None or sock is None or client.socket() is not sock:
            return
        if client.want_write():
            client.loop_write()
        want = client.socket() is sock and client.want_write()
        try:
            key = self._selector.get_key(sock)  # type: ignore[arg-type]
        except (KeyError, ValueError):
            return
        if want != bool(key.events & selectors.EVENT_WRITE):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._selector.modify(sock, events, dev)  # type: ignore[arg-type]

    def _shutdown(self) -> None:
        clients = []
        for dev in self.devices:
            c = dev.client
            if c is None or not dev.online:
                continue
            topic, payload = dev.farewell()
            with contextlib.suppress(Exception):
                c.publish(topic, payload, qos=0, retain=True)
                c.disconnect()
                clients.append(c)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(c.want_write() for c in clients):
            for c in clients:
                if c.want_write():
                    c.loop_write()
            time.sleep(0.01)
        for dev in self.devices:
            dev.online = False
        self._selector.close()


class SimFleet:
    """``count`` simulated devices on ``loops`` threads; ``start``, watch ``snapshot``, ``stop``."""

    def __init__(
        self,
        ids: Iterable[str],
        *,
        broker: BrokerTarget | Sequence[BrokerTarget],
        trust: TrustAnchor,
        settings: SimSettings,
        seed: str = "edgefleet",
        loops: int = 2,
    ) -> None:
        shared = SimShared(trust, settings)
        self.devices = [SimDevice(d, key=device_key(seed, d), shared=shared) for d in ids]
        #: ``broker``: one broker, or several independent ones (shards, docs/scale.md) in their configured order
        self.brokers: tuple[BrokerTarget, ...] = (broker,) if isinstance(broker, BrokerTarget) else tuple(broker)
        if not self.brokers:
            raise ValueError("no broker to connect to")
        self.broker = self.brokers[0]
        self._stop = threading.Event()
        n = max(1, min(loops, len(self.devices) or 1))
        self.shards = [_Shard(i, self.devices[i::n], self.brokers, self._stop) for i in range(n)]

    def start(self) -> SimFleet:
        for s in self.shards:
            s.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self.shards:
            s.join(timeout=15)

    def check(self) -> None:
        """Raise what made a shard thread die (a bug), so callers do not wait on a dead fleet."""
        for s in self.shards:
            if s.error is not None:
                raise RuntimeError(f"simulator loop {s.name} failed: {s.error!r}") from s.error

    def refusals(self) -> dict[str, str]:
        """Device id -> why its connection was refused in a way retrying will not fix (wrong password, TLS)."""
        out: dict[str, str] = {}
        for s in self.shards:
            out.update(s.refused.copy())  # one C call: atomic under the GIL
        return out

    def snapshot(self) -> FleetSnapshot:
        lifecycle: Counter[str] = Counter()
        active: Counter[str] = Counter()
        committed: Counter[str] = Counter()
        online = chunks = dups = sent = retries = 0
        for d in self.devices:
            online += d.online
            lifecycle[d.lifecycle] += 1
            active[_ref_key(d.active)] += 1
            if d.lifecycle == "idle":
                committed[_ref_key(d.committed)] += 1
            chunks += d.counters.chunks
            dups += d.counters.duplicate_chunks
            sent += d.counters.published_bytes
            retries += d.counters.retries
        return FleetSnapshot(len(self.devices), online, dict(lifecycle), dict(active), dict(committed), chunks, dups,
                             sent, retries)

    def timeline(self) -> dict[str, dict[str, float]]:
        """Per milestone, seconds after the first device accepted its desired state: min, median, max."""
        marks: dict[str, list[float]] = {}
        for d in self.devices:
            for kind, ts in d.counters.milestones.items():
                marks.setdefault(kind, []).append(ts)
        origin = min(marks.get(EventKind.DESIRED_ACCEPTED, [0.0]))
        out: dict[str, dict[str, float]] = {}
        for kind, values in marks.items():
            values.sort()
            out[kind] = {"n": len(values), "min": round(values[0] - origin, 3),
                         "median": round(values[len(values) // 2] - origin, 3), "max": round(values[-1] - origin, 3)}
        return out

    def wait(self, predicate: object, timeout: float) -> bool:
        """Poll ``predicate(snapshot)`` until true or ``timeout`` (seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if predicate(self.snapshot()):  # type: ignore[operator]
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
