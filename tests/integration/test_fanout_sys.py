"""The fan-out pace's signal from a real mosquitto: the server's login reads the $SYS counters through the ACL,
and chunks a subscriber has not acknowledged show up as a lead (server/fanout.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.topics import artifact_topic
from server.app import FleetServer
from server.broker import SERVER_USER, MosquittoBroker
from server.builds import StaticBuilds
from server.fanout import RETAINED_TOPIC, STORED_TOPIC, SYS_TOPICS, FanoutPace, PaceSettings
from server.publisher import MqttLink
from tests.conftest import SecureBrokerFactory
from tests.support.servers.fleet import server_config

ART = "cd" * 16


def test_a_subscriber_that_does_not_acknowledge_makes_a_lead(secure_broker: SecureBrokerFactory) -> None:
    broker, passwords = secure_broker(["dev-slow"], tls=False)
    pace = FanoutPace(PaceSettings(max_lead_bytes=4 * 1000, hold_s=0.0))
    lock = threading.Lock()
    seen: dict[str, int] = {}
    ingested: list[str] = []
    changed = threading.Condition(lock)

    def on_sys(topic: str, payload: bytes) -> None:
        with changed:
            seen[topic] = seen.get(topic, 0) + 1
            pace.observe("b", topic, payload, time.monotonic())
            changed.notify_all()

    link = MqttLink(host=broker.host, port=broker.port, client_id="srv-fanout", username=SERVER_USER,
                    password=passwords[SERVER_USER], sys_topics=SYS_TOPICS, on_sys=on_sys,
                    on_message=lambda topic, payload, retained: ingested.append(topic))
    # a device session that subscribes the shared stream and then stops reading (persistent, offline)
    dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-slow", clean_session=False)
    dev.username_pw_set("dev-slow", passwords["dev-slow"])
    subscribed = threading.Event()
    dev.on_subscribe = lambda *a: subscribed.set()
    dev.connect(broker.host, broker.port)
    dev.loop_start()
    dev.subscribe(artifact_topic(ART), qos=1)
    assert subscribed.wait(10)
    dev.disconnect()
    dev.loop_stop()
    link.start()
    try:
        with changed:
            assert changed.wait_for(lambda: seen.get(STORED_TOPIC, 0) >= 1 and RETAINED_TOPIC in seen, 10)
            start = seen[STORED_TOPIC]
        for _ in range(20):
            pace.note_chunk(1000)
            link.publish(artifact_topic(ART), b"x" * 1000)
        with changed:  # the broker holds the 20 chunks for the offline session: the next passes say so
            assert changed.wait_for(lambda: pace.lead >= 20, 10), f"lead {pace.lead} after {seen[STORED_TOPIC] - start}"
        assert not [t for t in ingested if t.startswith("$SYS")]  # counters never reach the device ingest
    finally:
        link.stop()


def test_a_server_with_a_fan_out_budget_reads_the_broker(tmp_path: Path, fresh_broker: MosquittoBroker) -> None:
    builds = StaticBuilds({})
    paced = FleetServer(server_config(tmp_path / "a", fresh_broker, {"publisher": {"broadcast_egress_mb_s": 100.0}}),
                        builds=builds).start()
    try:
        pace = paced.chunks.pace
        assert pace is not None
        deadline = time.monotonic() + 15
        while pace.samples < 2 and time.monotonic() < deadline:  # two broker passes: the link reads $SYS
            time.sleep(0.05)
        assert pace.samples >= 2
        assert paced.chunks.pace_state()[0] == 1.0  # nothing streamed: the full budget
        metrics = paced.render_metrics()
        assert "edgefleet_broadcast_pace 1" in metrics
        assert "edgefleet_broadcast_pace_cuts_total 0" in metrics
    finally:
        paced.stop()
