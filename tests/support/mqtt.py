"""A small synchronous paho client for tests: connect, publish, and wait for messages."""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class MqttTestClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_cert: Path | None = None,
        clean_start: bool = True,
    ) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            clean_session=clean_start,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_cert is not None:
            self.client.tls_set(ca_certs=str(ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._connected = threading.Event()
        self.connect_rc: object = None
        self.subscribe_results: queue.Queue[list[object]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError(f"could not connect to {host}:{port}")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self.connect_rc = rc
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: list[object], props: object) -> None:
        self.subscribe_results.put(list(rcs))

    def subscribe(self, topic: str, qos: int = 1) -> list[object]:
        self.client.subscribe(topic, qos)
        return self.subscribe_results.get(timeout=10)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def expect(self, timeout: float = 10.0, topic_prefix: str | None = None) -> Received:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message{' on ' + topic_prefix if topic_prefix else ''} within {timeout}s")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic_prefix is None or msg.topic.startswith(topic_prefix):
                return msg

    def before(self, sentinel: bytes, timeout: float = 10.0) -> list[Received]:
        """Everything received before ``sentinel`` (a message the test publishes after the ones it checks).

        The broker routes a message when it receives it, so whatever an acknowledged earlier publish would
        have delivered to this client arrives before a sentinel published after it: no waiting window.
        """
        out = []
        while (msg := self.expect(timeout)).payload != sentinel:
            out.append(msg)
        return out

    def pending(self) -> list[Received]:
        """What has arrived so far, without waiting (for polling loops that wait on state elsewhere)."""
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def login_accepted(host: str, port: int, username: str, password: str, *, ca_cert: Path | None = None) -> bool:
    """Whether the broker accepts this login now (False when it refuses it or drops the connection)."""
    try:
        client = MqttTestClient(host, port, username=username, password=password, ca_cert=ca_cert)
    except (TimeoutError, OSError):
        return False
    rc = client.connect_rc
    client.close()
    return not getattr(rc, "is_failure", False)


def wait_login(host: str, port: int, username: str, password: str, *, accepted: bool, ca_cert: Path | None = None,
               timeout: float = 20.0) -> None:
    """Until the broker accepts (or refuses) the login: after a SIGHUP, mosquitto re-reads its files when it can."""
    deadline = time.monotonic() + timeout
    while login_accepted(host, port, username, password, ca_cert=ca_cert) != accepted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{username}'s login still {'refused' if accepted else 'accepted'} after {timeout}s")
        time.sleep(0.1)
