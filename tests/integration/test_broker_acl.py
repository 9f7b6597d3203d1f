"""The broker config `edgefleet broker config` generates, run by a real mosquitto: TLS, logins, ACLs.

A device may read only its own down-topics and the shared artifact topics, and write only its own
up-topics: it can neither read another device's traffic nor publish a command.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.protocol.topics import Channel, artifact_topic, device_topic
from server.broker import SERVER_USER, current_user, free_port
from server.cli import main as edgefleet
from server.config import load_config
from server.keys import init_signing_key, server_broker_password
from server.service import FleetService
from tests.support.abuse import local_service, start_mosquitto
from tests.support.mqtt import MqttTestClient, login_accepted, wait_login

pytestmark = pytest.mark.broker

DEV_KEY = "A" * 43 + "="


@dataclass
class Secured:
    home: Path
    out: Path
    port: int
    passwords: dict[str, str]
    process: subprocess.Popen[bytes]
    service: FleetService

    @property
    def ca(self) -> Path:
        return self.out / "tls" / "ca.crt"

    def client(self, user: str, password: str | None = None) -> MqttTestClient:
        return MqttTestClient("127.0.0.1", self.port, username=user,
                              password=password if password is not None else self.passwords[user], ca_cert=self.ca)

    def regenerate(self, *, refused: str) -> None:
        """Write the broker files again and SIGHUP mosquitto; return once ``refused``'s login is refused."""
        password = self.passwords[refused]
        assert edgefleet(["--home", str(self.home), "broker", "config", "--out", str(self.out), "--listen",
                          "127.0.0.1", "--port", str(self.port), "--run-as", current_user()]) == 0
        self.process.send_signal(signal.SIGHUP)  # mosquitto re-reads the password file and ACL
        wait_login("127.0.0.1", self.port, refused, password, accepted=False, ca_cert=self.ca)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    home, out = tmp_path / "home", tmp_path / "broker"
    service = local_service(home)
    config, registry = service.config, service.registry
    passwords = {}
    for dev in ("dev-a", "dev-b"):
        passwords[dev] = service.register_device(dev, profile="rpi4", public_key=DEV_KEY)["broker_password"]

    def configure(port: int) -> Path:
        # the test's own files live in a private temp dir: this broker stays the invoking user, explicitly
        assert edgefleet(["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                          "--port", str(port), "--run-as", current_user()]) == 0
        return out / "mosquitto.conf"

    proc, port = start_mosquitto(configure, tmp_path / "mosquitto.log")
    try:
        passwords[SERVER_USER] = str(server_broker_password(config.paths, create=False))
        conf = (out / "mosquitto.conf").read_text()
        assert "set_tcp_nodelay true" in conf and "acl_file" in conf and "certfile" in conf
        assert "allow_anonymous false" in conf
        assert all(pw not in (out / "passwd").read_text() for pw in passwords.values())  # only hashes on disk
        yield Secured(home, out, port, passwords, proc, service)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        registry.db.close()


def test_device_reads_only_its_own_down_topics_and_artifacts(secured: Secured) -> None:
    server, a, b = secured.client(SERVER_USER), secured.client("dev-a"), secured.client("dev-b")
    try:
        a.subscribe(device_topic("dev-b", Channel.DESIRED))
        a.subscribe(device_topic("dev-b", Channel.COMMAND))
        a.subscribe(device_topic("dev-b", Channel.STATE))
        a.subscribe("edgefleet/v1/dev/dev-a/down/#")
        a.subscribe(artifact_topic("1" * 32))
        b.subscribe("edgefleet/v1/dev/dev-b/down/#")
        server.publish(device_topic("dev-b", Channel.DESIRED), b"for-b-desired", retain=True)
        server.publish(device_topic("dev-b", Channel.COMMAND), b"for-b-cmd")
        b.publish(device_topic("dev-b", Channel.STATE), b"b-state", retain=True)
        assert {b.expect().payload, b.expect().payload} == {b"for-b-desired", b"for-b-cmd"}
        server.publish(device_topic("dev-a", Channel.COMMAND), b"for-a")
        server.publish(artifact_topic("1" * 32), b"chunk")
        got = {a.expect().payload, a.expect().payload}
        assert got == {b"for-a", b"chunk"}
        server.publish(device_topic("dev-a", Channel.COMMAND), b"flush-a")
        leaked = [m for m in a.before(b"flush-a") if b"for-b" in m.payload or m.payload == b"b-state"]
        assert not leaked, f"dev-a read dev-b's traffic: {leaked}"
    finally:
        for c in (server, a, b):
            c.close()


def test_device_cannot_publish_commands_or_impersonate_another_device(secured: Secured) -> None:
    server, a, b = secured.client(SERVER_USER), secured.client("dev-a"), secured.client("dev-b")
    try:
        b.subscribe("edgefleet/v1/dev/dev-b/down/#")
        a.subscribe("edgefleet/v1/dev/dev-a/down/#")
        server.subscribe("edgefleet/v1/dev/+/up/#")
        a.publish(device_topic("dev-b", Channel.COMMAND), b"forged-cmd")
        a.publish(device_topic("dev-a", Channel.COMMAND), b"self-cmd")  # not even to itself
        a.publish(device_topic("dev-b", Channel.DESIRED), b"forged-desired", retain=True)
        a.publish(artifact_topic("2" * 32), b"forged-chunk")
        a.publish(device_topic("dev-b", Channel.EVENT), b"forged-event")
        a.publish(device_topic("dev-a", Channel.EVENT), b"genuine")
        got = server.expect()
        assert (got.topic, got.payload) == (device_topic("dev-a", Channel.EVENT), b"genuine")
        # sentinels published after everything above: what arrives before them is all that ever will
        server.publish(device_topic("dev-b", Channel.COMMAND), b"flush-b")
        server.publish(device_topic("dev-a", Channel.COMMAND), b"flush-a")
        a.publish(device_topic("dev-a", Channel.EVENT), b"flush-up")
        assert not b.before(b"flush-b"), "dev-b received something dev-a published"
        assert not [m for m in a.before(b"flush-a") if m.payload == b"self-cmd"]
        assert not [m for m in server.before(b"flush-up") if m.payload.startswith(b"forged")]
    finally:
        for c in (server, a, b):
            c.close()


def test_logins_are_checked_and_revocation_takes_effect_after_reload(secured: Secured) -> None:
    with pytest.raises((TimeoutError, ConnectionError, OSError)):
        c = secured.client("dev-a", password="wrong")
        rc = c.connect_rc
        c.close()
        if getattr(rc, "is_failure", False):
            raise ConnectionError(str(rc))
    ok = secured.client("dev-b")
    ok.close()
    secured.service.revoke_device("dev-b")
    secured.regenerate(refused="dev-b")  # the revocation takes effect once mosquitto reloaded (polled, not slept)
    assert "dev-b" not in (secured.out / "passwd").read_text()
    assert not login_accepted("127.0.0.1", secured.port, "dev-b", secured.passwords["dev-b"], ca_cert=secured.ca)
    still = secured.client("dev-a")  # other devices are unaffected
    still.close()


def test_generated_config_runs_mosquitto_as_the_mosquitto_user_not_root(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_signing_key(load_config(home).paths)
    base = Path(tempfile.mkdtemp(prefix="edgefleet-acl-"))  # pytest's tmp dirs are 0700: mosquitto could not enter
    base.chmod(0o755)
    out, port = base / "broker", free_port()
    proc: subprocess.Popen[bytes] | None = None
    try:
        assert edgefleet(["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                          "--port", str(port)]) == 0
        conf = (out / "mosquitto.conf").read_text()
        assert [line for line in conf.splitlines() if line.startswith("user ")] == ["user mosquitto"]
        assert edgefleet(["--home", str(home), "broker", "config", "--out", str(base / "other"), "--port",
                          str(port), "--run-as", "edgefleet-no-such-user"]) == (1 if os.geteuid() == 0 else 0)
        if os.geteuid() != 0:
            return  # mosquitto ignores `user` unless started as root: the config line is all there is to check
        account = pwd.getpwnam("mosquitto")
        for f in (out, out / "passwd", out / "acl", out / "tls" / "server.key"):
            assert f.stat().st_uid == account.pw_uid, f
        assert (out / "passwd").stat().st_mode & 0o777 == 0o600

        def configure(listen: int) -> Path:
            assert edgefleet(["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                              "--port", str(listen)]) == 0
            return out / "mosquitto.conf"

        # it listens once it read passwd, the ACL and the TLS key after switching user
        proc, port = start_mosquitto(configure, base / "mosquitto.log")
        uid = next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert int(uid) == account.pw_uid != 0
        password = str(server_broker_password(load_config(home).paths, create=False))
        server = MqttTestClient("127.0.0.1", port, username=SERVER_USER, password=password,
                                ca_cert=out / "tls" / "ca.crt")
        rc = server.connect_rc
        server.close()
        assert not getattr(rc, "is_failure", False), rc
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_a_login_cannot_take_over_another_devices_client_id(secured: Secured) -> None:
    """dev-a connects with dev-b's client id: dev-b is not kicked, its Will does not fire, its session stays."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    observer = secured.client(SERVER_USER)
    observer.subscribe(device_topic("dev-b", Channel.STATE))
    victim = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-b", clean_session=False,
                         protocol=mqtt.MQTTv311)
    victim.username_pw_set("dev-b", secured.passwords["dev-b"])
    victim.tls_set(ca_certs=str(secured.ca))
    victim.will_set(device_topic("dev-b", Channel.STATE), b"will-offline", qos=1, retain=True)
    connected, dropped, subscribed = threading.Event(), threading.Event(), threading.Event()
    got: list[bytes] = []
    victim.on_connect = lambda *a: connected.set()
    victim.on_subscribe = lambda *a: subscribed.set()
    victim.on_disconnect = lambda *a: dropped.set()
    victim.on_message = lambda c, u, m: got.append(bytes(m.payload))
    victim.connect("127.0.0.1", secured.port)
    victim.loop_start()
    attacker = None
    try:
        assert connected.wait(10)
        victim.subscribe("edgefleet/v1/dev/dev-b/down/#", qos=1)
        assert subscribed.wait(10)
        observer.publish(device_topic("dev-b", Channel.COMMAND), b"before")
        deadline = time.monotonic() + 60
        while b"before" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"before" in got
        attacker = MqttTestClient("127.0.0.1", secured.port, username="dev-a", password=secured.passwords["dev-a"],
                                  ca_cert=secured.ca, client_id="dev-b", clean_start=True)
        assert not getattr(attacker.connect_rc, "is_failure", False)
        observer.publish(device_topic("dev-b", Channel.COMMAND), b"after")
        deadline = time.monotonic() + 60
        while b"after" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"after" in got, "dev-b lost its session"
        assert not dropped.is_set(), "dev-b was kicked off by a login with its client id"
        observer.publish(device_topic("dev-b", Channel.STATE), b"sentinel")  # a Will would have come before it
        assert not [m for m in observer.before(b"sentinel") if m.payload == b"will-offline"], "dev-b's Will fired"
    finally:
        if attacker is not None:
            attacker.close()
        victim.disconnect()
        victim.loop_stop()
        observer.close()


def test_devices_get_only_the_protocols_leaf_topics(secured: Secured) -> None:
    """No `up/#`: a device cannot publish (or retain) anything outside the protocol's leaves, even its own."""
    server, a = secured.client(SERVER_USER), secured.client("dev-a")
    try:
        server.subscribe("edgefleet/v1/dev/dev-a/#")
        for topic in ("edgefleet/v1/dev/dev-a/up/junk", "edgefleet/v1/dev/dev-a/up/state/x",
                      "edgefleet/v1/dev/dev-a/up/event/1", "edgefleet/v1/dev/dev-a/upx"):
            a.publish(topic, b"stored?", retain=True)
        a.publish(device_topic("dev-a", Channel.EVENT), b"genuine")
        got = server.expect()
        assert (got.topic, got.payload) == (device_topic("dev-a", Channel.EVENT), b"genuine")
        a.publish(device_topic("dev-a", Channel.EVENT), b"sentinel")  # same connection: routed in order
        assert not [m for m in server.before(b"sentinel") if m.payload == b"stored?"]
    finally:
        server.close()
        a.close()
    late = secured.client(SERVER_USER)  # a new subscriber would get any retained copy
    try:
        late.subscribe("edgefleet/v1/dev/dev-a/#")
        late.publish(device_topic("dev-a", Channel.COMMAND), b"sentinel")  # retained copies come on SUBACK, first
        kept = [m for m in late.before(b"sentinel") if m.payload == b"stored?"]
        assert not kept, "the broker kept a retained message"
    finally:
        late.close()


def test_packets_over_the_protocols_largest_are_refused(secured: Secured) -> None:
    from agent.protocol.envelope import MAX_CHUNK_MESSAGE
    from server.broker import PROTOCOL_MAX_PACKET

    assert f"max_packet_size {PROTOCOL_MAX_PACKET}" in (secured.out / "mosquitto.conf").read_text()
    server, a = secured.client(SERVER_USER), secured.client("dev-a")
    try:
        a.subscribe(device_topic("dev-a", Channel.CHUNK, "1" * 32))
        server.publish(device_topic("dev-a", Channel.CHUNK, "1" * 32), b"c" * MAX_CHUNK_MESSAGE)  # the largest chunk
        assert len(a.expect().payload) == MAX_CHUNK_MESSAGE
        server.subscribe(device_topic("dev-a", Channel.EVENT))
        a.client.publish(device_topic("dev-a", Channel.EVENT), b"x" * PROTOCOL_MAX_PACKET, qos=0)
        a.close()
        a = secured.client("dev-a")
        a.publish(device_topic("dev-a", Channel.EVENT), b"small")
        got = server.expect(timeout=15)
        assert got.payload == b"small", f"the broker passed on a packet of {len(got.payload)} bytes"
    finally:
        server.close()
        a.close()


def test_reserved_names_can_never_be_devices(secured: Secured) -> None:
    from server.errors import InvalidRequestError

    for bad in (SERVER_USER, "EdgeFleet-Server", "edgefleet-server-2", "a/b", "x" * 65, "%u"):
        with pytest.raises(InvalidRequestError):
            secured.service.register_device(bad, profile="rpi4", public_key=DEV_KEY)
    # a row that got in some other way (an old registry): the broker config refuses to write it
    registry = secured.service.registry
    registry.add_device(SERVER_USER, profile="rpi4", public_key=DEV_KEY, broker_hash=registry.broker_users()["dev-a"])
    before = (secured.out / "passwd").read_text()
    assert edgefleet(["--home", str(secured.home), "broker", "config", "--out", str(secured.out), "--listen",
                      "127.0.0.1", "--port", str(secured.port), "--run-as", current_user()]) == 1
    assert (secured.out / "passwd").read_text() == before
    ok = secured.client(SERVER_USER)  # the server's own login still works
    ok.close()


def test_several_server_processes_each_have_a_login(secured: Secured) -> None:
    """Client id = username, so every server process needs its own login: `--server-logins N` makes them."""
    assert edgefleet(["--home", str(secured.home), "broker", "config", "--out", str(secured.out), "--listen",
                      "127.0.0.1", "--port", str(secured.port), "--run-as", current_user(),
                      "--server-logins", "2"]) == 0
    secured.process.send_signal(signal.SIGHUP)
    second = f"{SERVER_USER}-2"
    password = (secured.home / "keys" / f"broker-{second}.password").read_text().strip()
    assert "user edgefleet-server-2\ntopic readwrite edgefleet/v1/#" in (secured.out / "acl").read_text()
    deadline = time.monotonic() + 60
    while True:  # mosquitto re-reads passwd on SIGHUP: until the new login is accepted
        other = MqttTestClient("127.0.0.1", secured.port, username=second, password=password, ca_cert=secured.ca)
        if not getattr(other.connect_rc, "is_failure", False) or time.monotonic() > deadline:
            break
        other.close()
        time.sleep(0.1)
    one, a = secured.client(SERVER_USER), secured.client("dev-a")
    try:
        assert not getattr(other.connect_rc, "is_failure", False), other.connect_rc
        for server in (one, other):
            server.subscribe(device_topic("dev-a", Channel.EVENT))
        a.publish(device_topic("dev-a", Channel.EVENT), b"to-both")
        assert one.expect().payload == other.expect().payload == b"to-both"  # neither took the other's session
    finally:
        for c in (one, other, a):
            c.close()
