"""The agent's MQTT link reads every packet its socket already holds per wake-up of paho's loop
(agent/runtime/mqtt.py, ``_Client``): stock paho 2.x reads one per ``select()``, which was ~15% of the network
thread's CPU on a 512-chunk transfer (docs/benchmarks.md). Real mosquitto; the agent's loop is held inside the
first message's hand-off while the broker fills its socket with the rest."""

from __future__ import annotations

import fcntl
import queue
import struct
import termios
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.runtime.config import BrokerConfig
from agent.runtime.mqtt import READ_BURST, Message
from agent.runtime.mqtt import MqttLink as AgentLink
from server.broker import MosquittoBroker
from tests.support.servers.stub import unique_device_id

pytestmark = pytest.mark.broker

MESSAGES = 40
PAYLOAD = 2000


class _HeldInbox(queue.Queue[Any]):
    """The agent's inbox; the first chunk message's hand-off waits for ``release`` (paho's thread is held there)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.release = threading.Event()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, Message) and not self.held.is_set():
            self.held.set()
            assert self.release.wait(30), "never released"
        super().put(item, block, timeout)


def _buffered(sock: Any) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def test_messages_queued_in_the_socket_are_read_in_one_wakeup(broker: MosquittoBroker) -> None:
    device_id = unique_device_id("burst")
    topic = f"edgefleet/v1/art/{device_id}"
    inbox = _HeldInbox()
    link = AgentLink(BrokerConfig(host=broker.host, port=broker.port, tls=False), client_id=device_id,
                     inbox=inbox, will=lambda session: (f"edgefleet/v1/dev/{device_id}/up/state", b""), boot=1)
    link.subscribe(topic)
    reads = [0]
    client = link._client
    real_loop_read = client.loop_read

    def counting_loop_read(max_packets: int = 1) -> Any:
        reads[0] += 1
        return real_loop_read(max_packets)

    client.loop_read = counting_loop_read  # type: ignore[method-assign]
    tx = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_device_id("burst-tx"), protocol=mqtt.MQTTv311)
    link.start()
    try:
        assert link.wait_connected(10), "agent link did not connect"
        tx.connect(broker.host, broker.port)
        tx.loop_start()
        # the subscription is in place once a message published after it arrives (held in the hand-off)
        deadline = time.monotonic() + 10
        while not inbox.held.is_set():
            assert time.monotonic() < deadline, "the first message never arrived"
            tx.publish(topic, b"first", qos=1).wait_for_publish(10)
            inbox.held.wait(0.2)
        payloads = [bytes([i]) * PAYLOAD for i in range(MESSAGES)]
        for p in payloads:
            tx.publish(topic, p, qos=1).wait_for_publish(10)
        sock = client.socket()
        deadline = time.monotonic() + 10
        while _buffered(sock) < MESSAGES * PAYLOAD:  # the broker has put them all in the agent's socket
            assert time.monotonic() < deadline, f"only {_buffered(sock)} bytes buffered"
            time.sleep(0.005)
        before = reads[0]
        inbox.release.set()
        got: list[bytes] = []
        while len(got) < MESSAGES:
            item = inbox.get(timeout=10)
            if isinstance(item, Message) and item.payload != b"first":
                got.append(item.payload)
        assert got == payloads  # complete and in order
        # stock paho: one loop_read per message (>= 40); here the held one's call reads on through the socket
        assert reads[0] - before <= -(-MESSAGES // READ_BURST) + 1
    finally:
        inbox.release.set()
        tx.disconnect()
        tx.loop_stop()
        link.stop()
