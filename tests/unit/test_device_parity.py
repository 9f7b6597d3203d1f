"""The agent and the simulator decide alike: the same signed message sequences, the same decisions.

Both call ``agent.core.intake``; what this guards is the shells around it (what each does with a
decision). Hypothesis generates sequences of signed desired states (deploys, pins, re-signed and
re-delivered ones, replays, expired ones, other devices') and commands (ping, purge, rollback,
activate), and feeds each sequence to a real ``Agent`` (real store on disk, real ModelHost, no
broker: ``_dispatch`` as in the malformed-input suite) and to a ``SimDevice`` (no client). After
every message both must be in the same lifecycle state with the same journal facts, and must have
emitted the same events (kind, code) in the same order.

Downgrades: in half the generated cases both devices start with a committed version
(installed and committed in the agent's real store; ``SimDevice.seed`` in the simulator) and the
generated deploys and pins go below, to and above it: the version floor refuses older deploys on both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.core.journal import JournalRecord
from agent.core.lifecycle import UpdateMachine
from agent.protocol.envelope import TrustAnchor, seal_artifact, seal_command, seal_desired, wrap_key
from agent.protocol.messages import Command, DesiredState, ModelRef
from agent.protocol.topics import Channel, device_topic
from agent.runtime.agent import Agent
from agent.runtime.config import load_config
from agent.runtime.host import ModelHost
from agent.runtime.inference import InferenceOptions
from agent.runtime.keys import generate_device_key
from agent.runtime.mqtt import Message
from server.simulator.device import SimDevice, SimSettings, SimShared
from tests.support.devices.agent_process import write_config
from tests.support.models import agent as agent_models
from tests.support.models import real_model

DEVICE = "parity-1"
NOW = 1_900_000_000.0

DOWNGRADE = ("desired.rejected", "downgrade")

#: one message: (kind, seq, version, variant) where variant picks the artifact / recipient / expiry
Step = tuple[str, int, int, int]

steps = st.lists(
    st.tuples(
        st.sampled_from(["deploy", "deploy", "pin", "ping", "purge", "rollback", "activate", "again"]),
        st.integers(min_value=1, max_value=12),  # seq: replays and gaps happen
        st.integers(min_value=1, max_value=4),  # version
        st.integers(min_value=0, max_value=5),  # 0-2: artifact a/b/c; 3: another device; 4: expired; 5: as 0
    ),
    min_size=1,
    max_size=10,
)


class Pair:
    """A real agent and a simulated device sharing one device key and one server key."""

    def __init__(self, tmp: Path) -> None:
        self.server_key = Ed25519PrivateKey.generate()
        key = generate_device_key(tmp / "device.key")
        (tmp / "server.pub").write_bytes(self.server_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        config = load_config(write_config(tmp / "agent.toml", {
            "device_id": DEVICE, "profile": "x86_64-onnx-test", "store_dir": str(tmp / "store"),
            "broker": {"host": "127.0.0.1", "port": 1, "tls": False},
            "keys": {"device_key": "device.key", "server_keys": ["server.pub"]},
            "http": {"enabled": False}, "log": {"level": "error"},
        }))
        trust = TrustAnchor.of(self.server_key.public_key())
        clock = lambda: NOW  # noqa: E731
        self.host = ModelHost(InferenceOptions(intra_op_threads=1))
        self.agent = Agent(config, host=self.host, device_key=key, trust=trust, clock=clock)
        self.sim = SimDevice(DEVICE, key=key, shared=SimShared(trust, SimSettings(clock_skew_s=300.0), clock=clock))
        self.agent_events: list[tuple[str, str | None]] = []
        self.sim_events: list[tuple[str, str | None]] = []
        self._tap(self.agent, self.agent_events)
        self._tap(self.sim, self.sim_events)
        self.artifacts = [seal_artifact(bytes([i]) * 3000, chunk_size=1024, compression="none", shared_topic=False)
                          for i in range(3)]
        self.device_public = key.public_key()
        self.last_blob: tuple[str, bytes] | None = None
        self.tmp = tmp

    def seed(self, version: int) -> None:
        """Both start serving m ``version``, committed, installed from artifact 0, which becomes the real digits
        model (the agent: installed in its real store and loaded by its real host, so a restore works on both)."""
        ref, model = ModelRef("m", version), real_model("digits").path.read_bytes()
        sealed = seal_artifact(model, chunk_size=16 * 1024, compression="none", shared_topic=False)
        self.artifacts[0] = sealed
        source = self.tmp / "seed.onnx"
        source.write_bytes(model)  # compression "none": the artifact is the model file
        kept = self.agent.store.install(ref=ref, info=sealed.info, runtime=agent_models.ONNX,
                                        health=agent_models.digits_health(), variant=None, source=source)
        self.agent.store.commit(ref)
        self.host.activate(self.host.load(kept.path, ref=ref, runtime=agent_models.ONNX))
        self.agent.machine = UpdateMachine(JournalRecord(committed=ref, committed_versions={ref.name: version}))
        self.sim.seed(ref, sealed.info.artifact_id)

    @staticmethod
    def _tap(device: Any, sink: list[tuple[str, str | None]]) -> None:
        original = device._event

        def event(kind: str, **kw: Any) -> None:
            sink.append((kind, kw.get("code")))
            original(kind, **kw)

        device._event = event

    def blob(self, step: Step) -> tuple[str, bytes]:
        kind, seq, version, variant = step
        if kind == "again" and self.last_blob is not None:
            return self.last_blob
        device = "someone-else" if variant == 3 else DEVICE
        expires = NOW - 3600 if variant == 4 else NOW + 3600
        if kind in ("deploy", "pin", "again"):
            sealed = self.artifacts[variant % 3]
            deploy = kind != "pin"
            desired = DesiredState(
                device_id=device, seq=seq, issued_at=NOW - 10, expires_at=expires,
                action="deploy" if deploy else "pin", model=ModelRef("m", version),
                artifact=sealed.info if deploy else None,
                key=wrap_key(sealed.data_key, self.device_public, artifact_id=sealed.info.artifact_id,
                             device_id=device) if deploy else None,
                runtime=agent_models.ONNX if deploy else None,
                health=agent_models.digits_health() if deploy else None,
            )
            out = (device_topic(DEVICE, Channel.DESIRED), seal_desired(desired, self.server_key))
        else:
            cmd = Command(device, seq, NOW - 10, expires, f"c-{seq}", kind, model="m",
                          version=version if kind == "activate" else None)
            out = (device_topic(DEVICE, Channel.COMMAND), seal_command(cmd, self.server_key))
        self.last_blob = out
        return out

    def feed(self, topic: str, payload: bytes) -> None:
        self.agent._dispatch(Message(topic, payload, False))
        self.agent._after_events()
        self.sim.on_message(topic, payload)

    def run(self, sequence: list[Step]) -> None:
        """Feed each step to both; after each, the same state and facts and the same events so far."""
        for step in sequence:
            self.feed(*self.blob(step))
            assert self.facts(self.agent) == self.facts(self.sim), step
            assert self.agent_events == self.sim_events, step

    def facts(self, device: Agent | SimDevice) -> tuple[Any, ...]:
        r = device.machine.record
        return (r.state, r.last_seq, r.last_desired_sha256, r.target, r.committed, r.artifact_id,
                device.trusted.desired_expires_at)


@pytest.fixture
def quiet() -> Iterator[None]:
    logger = logging.getLogger("agent")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    yield
    logger.setLevel(level)


#: deploys and pins around the committed version 3 (1-2 below it: downgrades; 3: the same; 4: newer)
downgrade_steps = st.lists(
    st.tuples(
        st.sampled_from(["deploy", "deploy", "deploy", "pin", "again", "rollback", "activate"]),
        st.integers(min_value=1, max_value=12),
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=5),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.one_of(st.tuples(st.none(), steps), st.tuples(st.just(3), downgrade_steps)))
def test_agent_and_simulator_decide_alike(case: tuple[int | None, list[Step]], quiet: None) -> None:
    """A fresh device, or one with v3 committed (then the version floor refuses older deploys)."""
    committed, sequence = case
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp))
        try:
            if committed is not None:
                pair.seed(committed)
                assert pair.facts(pair.agent) == pair.facts(pair.sim)
            pair.run(sequence)
            event(f"committed {committed}: downgrades refused {pair.agent_events.count(DOWNGRADE)}")
        finally:
            pair.host.close()


@pytest.mark.parametrize(("version", "refused"), [(1, True), (2, True), (3, False), (4, False)])
def test_the_version_floor_refuses_older_deploys_on_both(version: int, refused: bool) -> None:
    """With v3 committed, a signed deploy of v1 or v2 is refused as a downgrade (its seq used up) by both."""
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp))
        try:
            pair.seed(3)
            pair.feed(*pair.blob(("deploy", 5, version, 1)))
            assert (DOWNGRADE in pair.agent_events) is refused, pair.agent_events
            assert pair.agent_events == pair.sim_events
            assert pair.facts(pair.agent) == pair.facts(pair.sim)
            assert pair.agent.machine.record.last_seq == 5  # authentic: the refusal uses up its seq
            assert pair.agent.machine.record.committed == ModelRef("m", 3)
        finally:
            pair.host.close()


def test_an_unkept_pin_raises_the_same_error_event_on_both() -> None:
    """The drift the intake removed: the agent raised error.version_not_kept for an unkept pin, the simulator not."""
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp))
        try:
            pair.feed(*pair.blob(("pin", 3, 2, 0)))
            assert ("desired.rejected", "version_not_kept") in pair.sim_events
            assert ("error.version_not_kept", "version_not_kept") in pair.sim_events
            assert pair.agent_events == pair.sim_events
        finally:
            pair.host.close()
