"""The server's MQTT connection: paced QoS 1 publishing and the subscription to every device's up-topics.

Theory of operation
    One paho-mqtt 2.x client per server process, with a persistent session (clean_session
    false, a stable client id per instance): device events published while the server was
    down or restarting wait in the broker and arrive when it reconnects. Publishing is paced: paho
    keeps ``max_inflight`` QoS 1 messages in flight and queues the rest, sending each from its own
    thread when a PUBACK frees the window (as a bare paho publisher does); a publisher that finds
    2 x ``max_inflight`` messages unacknowledged waits until only ``max_inflight`` are, so a large
    artifact never piles up unbounded in paho's or the broker's queues, and the publishing thread
    wakes once per ``max_inflight`` acknowledgements rather than once per message (a semaphore slot
    per message woke it 512 times a 32 MB artifact: ~20 ms of the server's CPU per transfer,
    docs/benchmarks.md). Publishing blocks, so it is only ever called from the server's own threads,
    never from paho's callback thread.

    Incoming messages are handed to ``on_message(topic, payload, retained)`` on paho's thread;
    the receiver must return quickly (the ingest queues them for its own thread). With
    ``sys_topics`` the link also subscribes those broker ``$SYS`` counters and hands them to
    ``on_sys(topic, payload)`` instead (the broadcast fan-out pace, server/fanout.py).

    With ``shared_subscriptions`` the device traffic (except retained state, which every
    process wants to see on connect) is subscribed as ``$share/edgefleet-server/...`` so that
    several server processes split it (MQTT 5 semantics; mosquitto also honours it for 3.1.1).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.topics import ROOT, shared_subscription
from agent.tcp import no_delay
from server.errors import PublishError

log = logging.getLogger("edgefleet.mqtt")

UP_CHANNELS = ("up/telemetry", "up/event", "up/chunkreq", "up/enroll", "up/measure")
STATE_FILTER = f"{ROOT}/dev/+/up/state"


class MqttLink:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        ca_cert: str | None = None,
        tls: bool = False,
        keepalive_s: int = 30,
        max_inflight: int = 64,
        shared_subscriptions: bool = False,
        subscribe: bool = True,
        on_message: Callable[[str, bytes, bool], None] | None = None,
        on_connection: Callable[[bool], None] | None = None,
        publish_timeout_s: float = 60.0,
        reconnect: bool = True,
        sys_topics: Sequence[str] = (),
        on_sys: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._sys_topics = tuple(sys_topics) if on_sys is not None else ()
        self._on_sys = on_sys
        self.host, self.port = host, port
        self._keepalive = keepalive_s
        self._subscribe = subscribe
        self._shared = shared_subscriptions
        self._on_message_cb = on_message
        self._on_connection = on_connection
        self._publish_timeout = publish_timeout_s
        #: published and not yet acknowledged, and the levels a publisher waits at and for (module doc)
        self._unacked = 0
        self._high = 2 * max_inflight
        self._low = max_inflight
        self._waiting = 0
        self._pending: set[int] = set()
        self._early: set[int] = set()
        self._pending_lock = threading.Condition(threading.Lock())
        self.connected = threading.Event()
        self._closing = False
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=reconnect,  # False: a taken-over session (server/takeover.py) is handed back
        )
        # paho's in-flight window; what is published beyond it (up to max_inflight more) waits in paho's queue
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=ca_cert or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = no_delay  # agent/tcp.py: no Nagle stalls on small publishes and acks

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, *, wait_s: float = 10.0) -> None:
        try:
            self.client.connect_async(self.host, self.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            raise PublishError(f"cannot reach the broker at {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()
        if wait_s and not self.connected.wait(wait_s):
            log.warning("broker %s:%d not connected yet; retrying in the background", self.host, self.port)

    def stop(self) -> None:
        self._closing = True
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # -- paho callbacks (paho's thread) -------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker refused the connection: %s", rc)
            return
        log.info("connected to broker %s:%d", self.host, self.port)
        if self._subscribe:
            subs: list[tuple[str, int]] = [(STATE_FILTER, 1)]
            for channel in UP_CHANNELS:
                topic = f"{ROOT}/dev/+/{channel}"
                subs.append((shared_subscription(topic) if self._shared else topic, 1))
            client.subscribe(subs)
        if self._sys_topics:
            client.subscribe([(topic, 0) for topic in self._sys_topics])
        self.connected.set()
        if self._on_connection is not None:
            self._on_connection(True)

    def sweep_retained(self) -> None:
        """Subscribe the device up-leaves that must never hold a retained message again: the broker re-sends
        any it keeps (retain flag set), which ingest then clears. Not with shared subscriptions (the broker
        sends no retained messages to those); the exact-leaf ACL bounds what a device can keep there."""
        if self._subscribe and not self._shared and self.connected.is_set():
            self.client.subscribe([(f"{ROOT}/dev/+/{channel}", 1) for channel in UP_CHANNELS])

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("lost the broker connection (%s); paho reconnects", rc)
        if self._on_connection is not None:
            self._on_connection(False)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic.startswith("$SYS/"):
                if self._on_sys is not None:
                    self._on_sys(msg.topic, bytes(msg.payload))
            elif self._on_message_cb is not None:
                self._on_message_cb(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # a bug in a receiver must not kill paho's network thread
            log.exception("message handler failed on %s", msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        # paho holds its own message lock here, so never wait on anything a publisher holds while
        # calling into paho: an acknowledgement that overtakes its publish() is parked in _early.
        with self._pending_lock:
            if mid in self._pending:
                self._pending.discard(mid)
                self._acked()
            else:
                self._early.add(mid)

    def _acked(self) -> None:
        """One publish acknowledged or given up (under ``_pending_lock``): wake the publishers at the low level."""
        self._unacked -= 1
        if self._waiting and self._unacked <= self._low:
            self._pending_lock.notify_all()

    # -- publishing (server threads only) -------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1 publish, waiting while 2 x max_inflight are unacknowledged (pacing); PublishError when it cannot."""
        with self._pending_lock:
            if self._unacked >= self._high:
                deadline = time.monotonic() + self._publish_timeout
                self._waiting += 1
                try:
                    while self._unacked > self._low:
                        if self._closing or time.monotonic() > deadline:
                            raise PublishError(f"publish to {topic} timed out waiting for the broker")
                        self._pending_lock.wait(0.5)
                finally:
                    self._waiting -= 1
            self._unacked += 1
        # not under the lock: paho holds its own message lock when it calls _on_publish
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            self._checked(info, topic)
        except BaseException:
            with self._pending_lock:
                self._acked()
            raise
        with self._pending_lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acked()
            else:
                self._pending.add(info.mid)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 publishes not yet acknowledged by the broker (in paho's window or queued behind it)."""
        with self._pending_lock:
            return self._unacked

    @staticmethod
    def _checked(info: mqtt.MQTTMessageInfo, topic: str) -> None:
        # NO_CONN is fine: paho keeps QoS 1 messages of a persistent session and sends them on reconnect
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}", reason_code=info.rc)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every QoS 1 publish so far has been acknowledged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._pending_lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False
