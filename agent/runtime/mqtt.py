"""The agent's MQTT link on paho-mqtt 2.x: the only module that touches paho.

Threading: paho runs its network loop on its own thread (``loop_start``) and calls our
callbacks there. Callbacks only translate what happened into an ``Inbound`` item and put it
on the agent's queue; all real work (signature checks, decryption, disk, inference) runs on the
agent's thread. The one exception is resubscribing in ``on_connect``, which paho recommends so
subscriptions survive a broker that lost the session; it only queues SUBSCRIBE packets.

Session: MQTT 3.1.1, ``clean_session=False`` and client id = device id, so QoS 1 commands sent
while the device was briefly offline are delivered on reconnect. Reconnects back off
exponentially (paho's ``reconnect_delay_set``). Every connection gets a session number that
grows across connections and restarts (``boot << 20 | n``); the Last Will is a retained
StateReport(online=False) carrying the number of the connection it belongs to, refreshed before
each reconnect, so a late Will from an old connection cannot mark a newer one offline.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.errors import TransportError
from agent.runtime.config import BrokerConfig
from agent.tcp import no_delay

log = logging.getLogger("agent.mqtt")

SESSION_BITS = 20
MAX_QUEUED_OUTBOUND = 10_000


@dataclass(frozen=True)
class Connected:
    session: int
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


Inbound = Connected | Disconnected | Message

#: packets read per wake-up of paho's network loop (see _Client)
READ_BURST = 64


class _Client(mqtt.Client):
    """paho's client reading every packet the socket already holds per wake-up of its network loop.

    paho 2.x reads one packet per ``select()`` while nothing of its own is in flight, and a QoS 1 PUBLISH's
    PUBACK is only sent on the loop's next turn: per 64 KiB chunk a ``select``, a read of paho's wake-up
    socketpair and the loop's Python around them (~15% of the network thread's CPU on a 512-chunk transfer,
    docs/benchmarks.md). Here the loop reads up to ``READ_BURST`` packets while the socket has data (a
    non-blocking read that would block ends the burst, exactly where paho would have waited in ``select``)
    and writes what they queued (PUBACKs) after each, so the broker's in-flight window refills as before.
    Built only on paho's ``_packet_read``/``_loop_rc_handle``/``loop_write`` (2.0-2.2); paho's own
    ``loop_read`` is used where they are missing.
    """

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(READ_BURST):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc > 0:
                return self._loop_rc_handle(rc)
            if self._out_packet:
                rc = self.loop_write()
                if rc or self._sock is None:
                    return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS


#: paho without the private methods _Client builds on (a future release): its own loop
_CLIENT = _Client if all(hasattr(mqtt.Client, name) for name in ("_packet_read", "_loop_rc_handle")) else mqtt.Client


class MqttLink:
    """Connect, keep connected, publish and subscribe; events arrive on ``inbox``."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        client_id: str,
        inbox: queue.Queue[Any],
        will: Callable[[int], tuple[str, bytes]],
        boot: int,
    ) -> None:
        self._config = config
        self._inbox = inbox
        self._will = will
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._connection = 0
        self._boot = boot
        self._connected = threading.Event()
        self._stopping = False
        client = _CLIENT(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            try:
                client.tls_set(
                    ca_certs=str(config.ca_cert) if config.ca_cert else None,
                    certfile=str(config.client_cert) if config.client_cert else None,
                    keyfile=str(config.client_key) if config.client_key else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TransportError(f"cannot set up TLS: {exc}") from exc
        # paho annotates the delays as int but stores and sleeps on them as seconds: fractions work
        client.reconnect_delay_set(
            min_delay=config.reconnect_min_s,  # type: ignore[arg-type]
            max_delay=config.reconnect_max_s,  # type: ignore[arg-type]
        )
        client.max_queued_messages_set(MAX_QUEUED_OUTBOUND)
        client.max_inflight_messages_set(32)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = no_delay  # see agent/tcp.py: Nagle cost ~40 ms per chunk request
        self._client = client
        self._set_will()

    @property
    def session(self) -> int:
        """The session number of the current (or next) connection."""
        return (self._boot << SESSION_BITS) | (self._connection & ((1 << SESSION_BITS) - 1))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _set_will(self) -> None:
        topic, payload = self._will(self.session)
        self._client.will_set(topic, payload, qos=1, retain=True)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._client.connect_async(self._config.host, self._config.port, keepalive=self._config.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {self._config.host}:{self._config.port}: {exc}") from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, *, farewell: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Disconnect cleanly (publishing ``farewell`` first, since a clean disconnect sends no Will)."""
        self._stopping = True
        if farewell is not None and self.connected:
            info = self._client.publish(farewell[0], farewell[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish the offline state before disconnecting")
        self._client.disconnect()
        self._client.loop_stop()

    # -- publish / subscribe (any thread) -----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Queue a message; paho sends it now or after the next reconnect. TransportError if refused."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} refused: {mqtt.error_string(info.rc)}", reason_code=info.rc)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subscriptions.pop(topic_filter, None)
        if known is not None and self.connected:
            self._client.unsubscribe(topic_filter)

    # -- paho callbacks (network thread: translate and enqueue, nothing else) ----------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._inbox.put(Disconnected(f"connection refused: {reason}"))
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:
            client.subscribe(subscriptions)
        self._connected.set()
        self._inbox.put(Connected(self.session, bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if self._stopping:
            return
        self._connection += 1
        self._set_will()  # the next connection's Will carries the next session number
        self._inbox.put(Disconnected(str(reason)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._inbox.put(Disconnected("connection failed"))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put(Message(message.topic, bytes(message.payload), bool(message.retain)))
