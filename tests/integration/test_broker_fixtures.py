"""The broker fixtures themselves: plain pub/sub, and the secured variant's TLS + ACL."""

from __future__ import annotations

import pytest

from agent.protocol.topics import Channel, artifact_topic, device_topic
from server.broker import SERVER_USER, MosquittoBroker
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
