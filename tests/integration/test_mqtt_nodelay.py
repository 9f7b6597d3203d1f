"""Both sides' MQTT connections run with TCP_NODELAY (agent/tcp.py): with Nagle on, a chunk request that follows
the ``download.started`` event waited ~40 ms for the broker's delayed ACK (docs/benchmarks.md)."""

from __future__ import annotations

import queue
import socket
from typing import Any

import pytest

from agent.runtime.config import BrokerConfig
from agent.runtime.mqtt import MqttLink as AgentLink
from server.broker import MosquittoBroker
from server.publisher import MqttLink as ServerLink
from tests.support.servers.stub import unique_device_id

pytestmark = pytest.mark.broker


def _nodelay(sock: Any) -> int:
    assert sock is not None, "not connected"
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_agent_link_sets_tcp_nodelay(broker: MosquittoBroker) -> None:
    device_id = unique_device_id("nodelay")
    inbox: queue.Queue[Any] = queue.Queue()
    link = AgentLink(BrokerConfig(host=broker.host, port=broker.port, tls=False), client_id=device_id,
                     inbox=inbox, will=lambda session: (f"edgefleet/v1/dev/{device_id}/up/state", b""), boot=1)
    link.start()
    try:
        assert link.wait_connected(10), "agent link did not connect"
        assert _nodelay(link._client.socket()) != 0
    finally:
        link.stop()


def test_server_link_sets_tcp_nodelay(broker: MosquittoBroker) -> None:
    link = ServerLink(host=broker.host, port=broker.port, client_id=unique_device_id("nodelay-srv"), subscribe=False)
    link.start(wait_s=10)
    try:
        assert link.connected.is_set(), "server link did not connect"
        assert _nodelay(link.client.socket()) != 0
    finally:
        link.stop()
