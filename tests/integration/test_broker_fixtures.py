"""The broker fixtures themselves: plain pub/sub, and the secured variant's TLS + ACL."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.protocol.topics import Channel, artifact_topic, device_topic
from server.broker import SERVER_USER, BrokerError, MosquittoBroker, listens
from tests.conftest import SecureBrokerFactory
from tests.support.mqtt import MqttTestClient

pytestmark = pytest.mark.broker


def test_plain_broker_round_trip(broker: MosquittoBroker) -> None:
    sub = MqttTestClient(broker.host, broker.port)
    pub = MqttTestClient(broker.host, broker.port)
    try:
        topic = device_topic("fixture-dev", Channel.EVENT)
        sub.subscribe(topic)
        pub.publish(topic, b"hello")
        assert sub.expect().payload == b"hello"
    finally:
        sub.close()
        pub.close()


def test_tcp_nodelay_is_configured(broker: MosquittoBroker) -> None:
    assert "set_tcp_nodelay true" in (broker.workdir / "mosquitto.conf").read_text()


def test_secure_broker_isolates_devices(secure_broker: SecureBrokerFactory) -> None:
    b, users = secure_broker(["dev-a", "dev-b"])
    tls = secure_broker.tls
    server = MqttTestClient(b.host, b.port, username=SERVER_USER, password=users[SERVER_USER], ca_cert=tls.ca_cert)
    dev_a = MqttTestClient(b.host, b.port, username="dev-a", password=users["dev-a"], ca_cert=tls.ca_cert)
    try:
        # dev-a may subscribe to dev-b's down topic (mosquitto 2.0 grants it) but never receives from it
        dev_a.subscribe(device_topic("dev-b", Channel.COMMAND))
        dev_a.subscribe(device_topic("dev-a", Channel.COMMAND))
        server.publish(device_topic("dev-b", Channel.COMMAND), b"for-b")
        dev_a.subscribe(artifact_topic("0" * 32))
        server.subscribe("edgefleet/v1/dev/+/up/#")
        # its own down topic and the shared artifact topic are readable
        server.publish(device_topic("dev-a", Channel.COMMAND), b"for-a")
        got_a = dev_a.expect()
        assert got_a.payload == b"for-a", "dev-a received a message from dev-b's down topic"
        server.publish(artifact_topic("0" * 32), b"chunk")
        assert dev_a.expect().payload == b"chunk"
        # it cannot publish a command to another device, nor impersonate dev-b's up topics
        dev_a.publish(device_topic("dev-b", Channel.COMMAND), b"forged")
        dev_a.publish(device_topic("dev-b", Channel.STATE), b"forged")
        dev_a.publish(device_topic("dev-a", Channel.STATE), b"genuine")
        got = server.expect()  # in order from one publisher: a forged message let through would come first
        assert got.payload == b"genuine"
        assert got.topic == device_topic("dev-a", Channel.STATE)
    finally:
        server.close()
        dev_a.close()


def test_secure_broker_rejects_bad_password(secure_broker: SecureBrokerFactory) -> None:
    b, _ = secure_broker(["dev-a"])
    with pytest.raises((TimeoutError, ConnectionError, OSError)):
        c = MqttTestClient(b.host, b.port, username="dev-a", password="wrong", ca_cert=secure_broker.tls.ca_cert)
        rc = c.connect_rc
        c.close()
        if getattr(rc, "is_failure", False):
            raise ConnectionError(str(rc))


def test_a_picked_port_taken_before_mosquitto_binds_it_is_replaced(tmp_path: Path) -> None:
    """Another process binds the picked port before mosquitto starts (the pick-then-bind race, forced):
    the first start picks another port and listens there itself; a restart keeps its port and says why not."""
    broker = MosquittoBroker(workdir=tmp_path / "mq")
    picked = broker.port
    with socket.socket() as thief:
        thief.bind((broker.host, picked))
        thief.listen()
        try:
            broker.start()
            assert broker.port != picked
            assert broker.process is not None and listens(broker.process.pid, broker.host, broker.port)
            assert not listens(broker.process.pid, broker.host, picked)  # the thief's, not ours
            client = MqttTestClient(broker.host, broker.port)  # a real MQTT round trip on the new port
            try:
                client.subscribe("test/moved")
                client.publish("test/moved", b"here")
                assert client.expect().payload == b"here"
            finally:
                client.close()
            broker.stop()
            with socket.socket() as second:  # the new port is taken while it is down: clients know only that one
                second.bind((broker.host, broker.port))
                second.listen()
                with pytest.raises(BrokerError, match="Address already in use"):
                    broker.start()
        finally:
            broker.close()


def test_a_given_port_that_is_taken_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        port = thief.getsockname()[1]
        broker = MosquittoBroker(port=port, workdir=tmp_path / "mq")
        with pytest.raises(BrokerError, match=f"(?s)port {port}.*Address already in use"):
            broker.start()
        broker.close()
        assert broker.port == port
