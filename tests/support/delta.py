"""Delta deploys for agent tests: a next version made from the real digits model, its EFD1 patch, and a signed
desired state that offers the patch beside the full artifact (as the server's dispatcher does)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from agent.protocol.delta import DESIRED_FIELD, DeltaInfo
from agent.protocol.envelope import SealedArtifact, wrap_key
from agent.protocol.messages import DesiredState, ModelRef
from server.delta import make_delta
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer


def fine_tuned(src: Path, seed: int = 5, scale: float = 0.02, prefix: str = "8.") -> bytes:
    """The classification head (initializers named ``prefix``*) nudged by ~``scale``, the backbone untouched: a
    head-only retrain's footprint; still classifies digits. (A dense fp32 fine-tune of every weight barely diffs
    losslessly: docs/benchmarks.md; the int8 builds with reused scales are what deltas are for.)"""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and init.name.startswith(prefix):
            init.CopyFrom(numpy_helper.from_array((w * (1 + rng.normal(0, scale, w.shape))).astype(w.dtype), init.name))
    return model.SerializeToString()


@dataclasses.dataclass(frozen=True)
class DeltaDeploy:
    desired: DesiredState
    full: SealedArtifact
    delta: SealedArtifact
    target: bytes


def deploy_delta(
    fleet: FleetServer,
    device_id: str,
    models: AgentModels,
    *,
    base: bytes,
    base_version: int,
    target: bytes,
    version: int,
    chunk_size: int = 4 * 1024,
    base_sha256: str | None = None,
    publish: bool = True,
) -> DeltaDeploy:
    """Seal ``target`` in full and as a patch over ``base``; publish a deploy offering both."""
    full = fleet.seal(target, chunk_size=chunk_size)
    patch = make_delta(base, target, "onnx")
    delta = fleet.seal(patch, chunk_size=1024, compression="none")
    public_key = fleet.log(device_id).public_key
    assert public_key is not None
    offer = DeltaInfo(
        artifact=delta.info,
        key=wrap_key(delta.data_key, public_key, artifact_id=delta.info.artifact_id, device_id=device_id),
        base_version=base_version,
        base_sha256=base_sha256 or hashlib.sha256(base).hexdigest(),
        target_sha256=full.info.sha256,
        target_size=full.info.size,
    )
    desired = fleet.desired_deploy(
        device_id, full, ModelRef(agent_models.NAME, version), runtime=agent_models.ONNX, health=models.health()
    )
    desired = dataclasses.replace(desired, extra={DESIRED_FIELD: offer.to_dict()})
    if publish:
        fleet.publish_desired(desired)
    return DeltaDeploy(desired, full, delta, target)


def requested(fleet: FleetServer, device_id: str) -> set[str]:
    """The artifact ids the device asked chunks of."""
    return {r.artifact_id for r in fleet.log(device_id).chunk_requests}
