"""Devices sharded over two independent mosquittos (docs/scale.md): one server connected to both, each
device on the shard its id hashes to, with logins and ACLs generated per shard; one rollout reaches all."""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.envelope import TrustAnchor, raw_public
from agent.protocol.messages import ModelRef
from agent.protocol.shards import shard_of
from agent.protocol.topics import ROOT
from server.app import FleetServer
from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, current_user
from server.builds import StaticBuilds
from server.cli import main as edgefleet
from server.config import ServerConfig, load_config
from server.keys import server_broker_password
from server.shards import ShardedLink, shard_users, topic_shard
from server.simulator import BrokerTarget, SimFleet, SimSettings, device_ids, device_key
from tests.support.abuse import local_service
from tests.support.mqtt import MqttTestClient, login_accepted
from tests.support.servers.fleet import onnx_builds, public_key, server_config

pytestmark = pytest.mark.broker

N = 10
DEV_KEY = "A" * 43 + "="


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("shard-builds"), "m", [1], ["rpi4"], hidden=1024)


def test_topic_routing() -> None:
    assert topic_shard(f"{ROOT}/dev/dev-0001/down/desired", 2) == shard_of("dev-0001", 2)
    assert topic_shard(f"{ROOT}/dev/dev-0001/down/chunk/{'a' * 32}", 3) == shard_of("dev-0001", 3)
    assert topic_shard(f"{ROOT}/art/{'a' * 32}", 2) is None  # a shared stream goes to every shard
    users = {SERVER_USER: "s", "dev-0000": "a", "dev-0001": "b"}
    tables = shard_users(users, [SERVER_USER], 2)
    assert all(t[SERVER_USER] == "s" for t in tables)
    assert sum(len(t) for t in tables) == 2 + 2  # each device on one shard only
    assert "dev-0001" in tables[shard_of("dev-0001", 2)]


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[tuple[list[MosquittoBroker], dict[str, str], str]]:
    """Two secured mosquittos, each with the server login and only its own devices' logins (as
    ``edgefleet broker config --shards 2`` writes them), the generated ACL on both."""
    ids = device_ids(N, "shd")
    server_pw = server_broker_password(ServerConfig(home=tmp_path / "home").paths)
    passwords = {d: secrets.token_urlsafe(12) for d in ids}
    tables = shard_users({SERVER_USER: str(server_pw)} | passwords, [SERVER_USER], 2)
    brokers = [MosquittoBroker(workdir=tmp_path / f"mq-{i}", persistence=True,
                               security=BrokerSecurity(tls=None, users=table)).start()
               for i, table in enumerate(tables)]
    try:
        yield brokers, passwords, str(server_pw)
    finally:
        for b in brokers:
            b.close()


def test_one_rollout_reaches_devices_on_two_shards(
    tmp_path: Path, shards: tuple[list[MosquittoBroker], dict[str, str], str], builds: StaticBuilds
) -> None:
    brokers, passwords, server_pw = shards
    ids = sorted(passwords)
    on = {i: [d for d in ids if shard_of(d, 2) == i] for i in (0, 1)}
    assert on[0] and on[1], "the ids spread over both shards"
    # each device logs in on its own shard only
    d0, d1 = on[0][0], on[1][0]
    assert login_accepted(brokers[0].host, brokers[0].port, d0, passwords[d0])
    assert not login_accepted(brokers[1].host, brokers[1].port, d0, passwords[d0])
    assert not login_accepted(brokers[0].host, brokers[0].port, d1, passwords[d1])

    config = server_config(tmp_path / "home", brokers[0], {"broker": {
        "shards": [b.url for b in brokers], "username": SERVER_USER, "password_file": "keys/broker-server.password"}})
    assert config.broker.urls == (brokers[0].url, brokers[1].url)
    server = FleetServer(config, builds=builds).start()
    try:
        assert isinstance(server.link, ShardedLink) and len(server.link) == 2
        for d in ids:
            key = base64.b64encode(raw_public(device_key("shard", d).public_key())).decode()
            server.service.register_device(d, profile="rpi4", public_key=key, groups=["sim"], broker_password=False)
        targets = [BrokerTarget(b.host, b.port, credentials=passwords) for b in brokers]
        with SimFleet(ids, broker=targets, trust=TrustAnchor.of(public_key(config)), settings=SimSettings(),
                      seed="shard", loops=2) as fleet:
            assert fleet.wait(lambda s: s.online == N, 30)
            deadline = time.monotonic() + 60  # the server saw every birth, from both brokers
            while sum(d.online for d in server.registry.list_devices()) < N:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            dep = server.service.deploy("m:1", target="group:sim", canary_percent=0, wave_percent=100,
                                        max_failures_percent=0, probation_s=0.2, actor="test")
            deadline = time.monotonic() + 60
            detail = server.service.deployment_detail(dep["deployment_id"])
            while detail["status"] not in ("completed", "rolled_back", "halted"):
                assert time.monotonic() < deadline, [(d["device_id"], d["state"]) for d in detail["devices"]]
                time.sleep(0.1)
                detail = server.service.deployment_detail(dep["deployment_id"])
            assert detail["status"] == "completed"
            assert sorted(d["device_id"] for d in detail["devices"] if d["state"] == "committed") == ids
            assert fleet.wait(lambda s: s.committed_on(ModelRef("m", 1)) == N, 10)
            count = server.artifacts.info(dep["artifacts"]["rpi4"]).chunk_count
            assert fleet.snapshot().chunks == N * count  # every device got every chunk, from its own broker

        # each broker keeps the retained desired state of its own devices, and only theirs
        for i, b in enumerate(brokers):
            c = MqttTestClient(b.host, b.port, username=SERVER_USER, password=server_pw)
            try:
                c.subscribe(f"{ROOT}/dev/+/down/desired")
                sentinel = b"sentinel-" + secrets.token_hex(4).encode()
                c.publish(f"{ROOT}/dev/zz-sentinel/down/desired", sentinel)
                retained = {m.topic.split("/")[3] for m in c.before(sentinel) if m.retain}
            finally:
                c.close()
            assert retained == set(on[i]), (i, retained)
    finally:
        server.stop()


def test_broker_config_writes_one_mosquitto_per_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, out = tmp_path / "home", tmp_path / "broker"
    service = local_service(home)
    ids = device_ids(6, "cfg")
    for d in ids:
        service.register_device(d, profile="rpi4", public_key=DEV_KEY)
    assert edgefleet(["--home", str(home), "broker", "config", "--out", str(out), "--shards", "2", "--no-tls",
                      "--listen", "127.0.0.1", "--port", "18830", "--run-as", current_user()]) == 0
    for i in (0, 1):
        conf = (out / f"shard-{i}" / "mosquitto.conf").read_text()
        assert f"listener {18830 + i} 127.0.0.1" in conf and "acl_file" in conf and "allow_anonymous false" in conf
        logins = {line.split(":", 1)[0] for line in (out / f"shard-{i}" / "passwd").read_text().splitlines()}
        assert logins == {SERVER_USER} | {d for d in ids if shard_of(d, 2) == i}
        assert (out / f"shard-{i}" / "acl").read_text() == (out / "shard-0" / "acl").read_text()
    config = load_config(home)
    assert config.broker.urls == ("mqtt://127.0.0.1:18830", "mqtt://127.0.0.1:18831")
    capsys.readouterr()
    assert edgefleet(["--home", str(home), "broker", "shard", ids[0], ids[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines] == [config.broker.urls[shard_of(d, 2)] for d in ids[:2]]
    assert edgefleet(["--home", str(home), "broker", "shard", "no/such"]) == 1  # a clear error, not a traceback
