"""agent.runtime.delta.plan: when a device takes a delta offer and why it falls back (real store, real files)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol.delta import DESIRED_FIELD, DeltaInfo
from agent.protocol.envelope import seal_artifact, wrap_key
from agent.protocol.messages import DesiredState, ModelRef
from agent.runtime import delta as delta_rt
from agent.runtime.store import ModelStore
from tests.unit.agent_runtime.test_store import HEALTH, RUNTIME, Clock, install, model_bytes


def _desired(*, base_sha: str, patch_size: int, base_version: int = 1) -> DesiredState:
    key = X25519PrivateKey.generate().public_key()
    full = seal_artifact(model_bytes(2), chunk_size=4096)
    patch = seal_artifact(b"p" * patch_size, chunk_size=4096, compression="none")
    offer = DeltaInfo(patch.info, wrap_key(patch.data_key, key, artifact_id=patch.info.artifact_id, device_id="d"),
                      base_version, base_sha, full.info.sha256, full.info.size)  # fmt: skip
    now = time.time()
    desired = DesiredState(
        device_id="d", seq=1, issued_at=now, expires_at=now + 60, action="deploy", model=ModelRef("m", 2),
        artifact=full.info, key=wrap_key(full.data_key, key, artifact_id=full.info.artifact_id, device_id="d"),
        runtime=RUNTIME, health=HEALTH,
    )  # fmt: skip
    return dataclasses.replace(desired, extra={DESIRED_FIELD: offer.to_dict()})


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "store", keep=3, clock=Clock())
    install(s, 1)
    return s


V1 = hashlib.sha256(model_bytes(1)).hexdigest()


def test_takes_a_small_delta_over_the_kept_base(store: ModelStore) -> None:
    desired = _desired(base_sha=V1, patch_size=100)
    assert desired.artifact is not None
    use, why = delta_rt.plan(desired, store, artifact_id=desired.artifact.artifact_id, max_ratio=0.6)
    assert why is None and use is not None and use.base.ref == ModelRef("m", 1)


@pytest.mark.parametrize(
    ("kwargs", "ratio", "reason"),
    [
        ({"base_sha": V1, "patch_size": 100_000}, 0.6, "over 60%"),
        ({"base_sha": V1, "patch_size": 100}, 0.0, "over 0%"),
        ({"base_sha": "0" * 64, "patch_size": 100}, 0.6, "digest differs"),
        ({"base_sha": V1, "patch_size": 100, "base_version": 3}, 0.6, "must be an older version"),
    ],
)
def test_falls_back_with_a_reason(store: ModelStore, kwargs: dict[str, object], ratio: float, reason: str) -> None:
    desired = _desired(**kwargs)  # type: ignore[arg-type]
    assert desired.artifact is not None
    use, why = delta_rt.plan(desired, store, artifact_id=desired.artifact.artifact_id, max_ratio=ratio)
    assert use is None and why is not None and reason in why, why


def test_missing_base_and_an_earlier_fallback(store: ModelStore) -> None:
    desired = _desired(base_sha=V1, patch_size=100)
    assert desired.artifact is not None
    artifact_id = desired.artifact.artifact_id
    v1 = store.find(ModelRef("m", 1))
    assert v1 is not None
    store.remove(v1)
    use, why = delta_rt.plan(desired, store, artifact_id=artifact_id, max_ratio=0.6)
    assert use is None and why is not None and "not kept" in why
    delta_rt.mark_failed(store, artifact_id, why)
    assert delta_rt.plan(desired, store, artifact_id=artifact_id, max_ratio=0.6) == (None, None), "reported once"
