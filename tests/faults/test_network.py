"""Network and broker faults with a real agent process: broker restart mid-transfer, dropped connections,
duplicated and reordered messages, a slow link. Every transfer ends committed; v1 serves throughout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.topics import Channel, device_topic
from server.broker import MosquittoBroker
from tests.faults.helpers import intact
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import assert_serves, deploy_and_commit, models
from tests.support.faults import FaultLedger, TcpProxy
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer, unique_device_id

__all__ = ["models"]

pytestmark = pytest.mark.broker


class Rig:
    """A test server and one agent on a broker of the test's own, optionally through a TCP proxy."""

    def __init__(self, tmp: Path, broker: MosquittoBroker, *, proxy: bool = False) -> None:
        self.broker = broker
        self.proxy = TcpProxy(broker.host, broker.port) if proxy else None
        self.fleet = FleetServer(broker.host, broker.port)
        port = self.proxy.port if self.proxy else broker.port
        self.agent = AgentProcess(tmp, unique_device_id("net"), broker_host=broker.host, broker_port=port,
                                  server=self.fleet).start()

    def close(self) -> None:
        self.agent.kill()
        self.fleet.close()
        if self.proxy:
            self.proxy.close()


@pytest.fixture
def rig(tmp_path: Path, fresh_broker: MosquittoBroker) -> Iterator[Rig]:
    r = Rig(tmp_path, fresh_broker)
    yield r
    r.close()


@pytest.fixture
def proxied(tmp_path: Path, fresh_broker: MosquittoBroker) -> Iterator[Rig]:
    r = Rig(tmp_path, fresh_broker, proxy=True)
    yield r
    r.close()


def _deploy_v2(rig: Rig, models: AgentModels, chunk_size: int = 1024) -> int:
    mark = rig.fleet.event_count(rig.agent.device_id)
    desired = rig.fleet.deploy(rig.agent.device_id, models.bytes_of("good_v2"), agent_models.ref(2),
                               runtime=agent_models.ONNX, health=models.health(probation_s=0.3), chunk_size=chunk_size)
    assert desired.artifact is not None
    return mark


def test_broker_restart_mid_transfer_resumes_without_resending(
    rig: Rig, models: AgentModels, ledger: FaultLedger
) -> None:
    fleet, agent, device = rig.fleet, rig.agent, rig.agent.device_id
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    held = fleet.chunk_limit = fleet.chunks_sent + 40  # of ~140: the broker dies with most of the stream to come
    asked_before = len(fleet.log(device).chunk_requests)
    mark = _deploy_v2(rig, models)
    fleet.wait_for(lambda: fleet.chunks_sent >= held and not fleet.streaming, timeout=30)
    # starved, the agent asks again for what it lacks: that request says which chunks it has stored
    fleet.wait_for(lambda: any(r.reason == "retry" for r in fleet.log(device).chunk_requests[asked_before:]),
                   timeout=30)
    retry = next(r for r in fleet.log(device).chunk_requests[asked_before:] if r.reason == "retry")
    fleet.serve_chunks = False  # the server side stays quiet with the broker (its stream loop stops)
    fleet.chunk_limit = None
    requests_before = len(fleet.log(device).chunk_requests)
    total = next(e.data["total"] for e in fleet.log(device).events[mark:] if e.kind == "download.started")
    last = total - sum(b - a for a, b in retry.ranges)  # stored before the broker died: never to be asked again
    assert 0 < last < total, (last, total)
    rig.broker.restart(kill=True)  # kill -9 of mosquitto; persistence keeps retained messages and sessions
    # the stream does not come back by itself: only the agent asking for what it lacks restarts it
    fleet.wait_for(lambda: len(fleet.log(device).chunk_requests) > requests_before, timeout=30)
    fleet.serve_chunks = True  # the agent's retry timer asks again; now it is served
    done = fleet.wait_event(device, lambda e: e.kind in ("lifecycle.committed", "lifecycle.failed",
                                                         "lifecycle.rolled_back"), after=mark, timeout=90)
    assert done.kind == "lifecycle.committed", done.message
    after = fleet.log(device).chunk_requests[requests_before:]
    assert after, ("the agent never asked again after the broker came back: "
                   f"{[(r.reason, r.ranges, r.ts) for r in fleet.log(device).chunk_requests]} "
                   f"{[(e.kind, e.ts, e.data.get('received')) for e in fleet.log(device).events[mark:]]} {time.time()}")
    asked = sum(b - a for a, b in after[0].ranges)
    assert asked <= total - last, f"asked again for {asked} chunks though only {total - last} were missing"
    assert after[0].reason in ("resume", "retry")
    ledger.note(f"after the broker restart the agent asked for {asked} of {total} chunks ({last} stored)")
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)


def test_connection_drops_during_transfer(proxied: Rig, models: AgentModels, ledger: FaultLedger) -> None:
    fleet, agent, device, proxy = proxied.fleet, proxied.agent, proxied.agent.device_id, proxied.proxy
    assert proxy is not None
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    step = 25  # chunks published per stretch (of ~140): each cut falls mid-transfer, whatever the machine's speed
    fleet.chunk_limit = fleet.chunks_sent + step
    mark = _deploy_v2(proxied, models)
    total = fleet.wait_event(device, "download.started", after=mark, timeout=60).data["total"]
    assert total > 3 * step, total
    cuts = 0
    for _ in range(3):
        limit = fleet.chunk_limit
        fleet.wait_for(lambda n=limit: fleet.chunks_sent >= n and not fleet.streaming, timeout=60)  # held there
        connections = proxy.connections
        cuts += proxy.cut()
        fleet.chunk_limit = limit + step  # served once the agent, reconnected, asks for what it lacks
        deadline = time.monotonic() + 30
        while proxy.connections <= connections:
            assert time.monotonic() < deadline, "the agent did not reconnect"
            time.sleep(0.02)
    fleet.chunk_limit = None
    done = fleet.wait_event(device, lambda e: e.kind in ("lifecycle.committed", "lifecycle.failed"), after=mark,
                            timeout=90)
    assert done.kind == "lifecycle.committed", done.message
    assert cuts == 3 and proxy.connections >= 4, (cuts, proxy.connections)
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)


def test_duplicated_and_reordered_messages(rig: Rig, models: AgentModels, ledger: FaultLedger) -> None:
    fleet, agent, device = rig.fleet, rig.agent, rig.agent.device_id
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    fleet.serve_chunks = False  # the test sends the chunks itself: shuffled, each two or three times
    artifact = fleet.seal(models.bytes_of("good_v2"), chunk_size=2048)
    desired = fleet.desired_deploy(device, artifact, agent_models.ref(2), runtime=agent_models.ONNX,
                                   health=models.health(probation_s=0.3))
    mark = fleet.event_count(device)
    blob = fleet.publish_desired(desired)
    for _ in range(2):  # the same desired state delivered again (QoS 1 duplicates, retained re-delivery)
        fleet.publish_raw(device_topic(device, Channel.DESIRED), blob, retain=True)
    fleet.wait_event(device, "download.started", after=mark)
    rng = random.Random("dup-reorder")
    order = [i for i in range(len(artifact.chunks)) for _ in range(rng.choice((2, 3)))]
    rng.shuffle(order)
    topic = device_topic(device, Channel.CHUNK, artifact.info.artifact_id)
    for i in order:
        fleet.client.publish(topic, artifact.chunks[i], qos=1)
    done = fleet.wait_event(device, lambda e: e.kind in ("lifecycle.committed", "lifecycle.failed"), after=mark,
                            timeout=90)
    assert done.kind == "lifecycle.committed", done.message
    kinds = fleet.kinds(device, mark)
    assert kinds.count("desired.accepted") == 1, kinds
    assert kinds.count("download.completed") == 1
    assert not [k for k in kinds if k.startswith("error.")], kinds
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)


def test_slow_link_keeps_serving_and_completes(proxied: Rig, models: AgentModels, ledger: FaultLedger) -> None:
    fleet, agent, device, proxy = proxied.fleet, proxied.agent, proxied.agent.device_id, proxied.proxy
    assert proxy is not None
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    proxy.rate_bps = 40_000  # ~40 kB/s to the device: the 140 kB artifact takes several retry timeouts
    started = time.monotonic()
    mark = _deploy_v2(proxied, models, chunk_size=4096)
    fleet.wait_event(device, "download.progress", after=mark, timeout=60)
    assert_serves(agent, models)  # v1 keeps answering while the slow download runs
    done = fleet.wait_event(device, lambda e: e.kind in ("lifecycle.committed", "lifecycle.failed"), after=mark,
                            timeout=120)
    elapsed = time.monotonic() - started
    assert done.kind == "lifecycle.committed", done.message
    assert elapsed > 2.0, f"the link was not slow ({elapsed:.1f}s)"
    ledger.note(f"slow link transfer took {elapsed:.1f}s")
    proxy.rate_bps = None
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)
