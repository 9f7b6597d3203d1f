"""server.delta.DeltaBuilder on real sealed artifacts: one shared delta per (base, target), none when not worth it."""

from __future__ import annotations

import hashlib
import lzma
import threading
from pathlib import Path

import numpy as np

from agent.protocol.delta import apply_bytes
from agent.protocol.envelope import open_artifact
from server.artifacts import ArtifactStore
from server.builds import Build
from server.delta import DeltaBuilder
from server.registry.db import Database
from server.registry.fleet import ArtifactRecord, FleetRegistry
from tests.support.delta import fine_tuned
from tests.support.models import agent as agent_models
from tests.support.models import real_model


def _store(tmp_path: Path) -> ArtifactStore:
    registry = FleetRegistry(Database(tmp_path / "registry.db"))
    registry.migrate()
    return ArtifactStore(tmp_path / "artifacts", registry)


def _build(path: Path, version: int) -> Build:
    return Build(
        model="digits", version=version, profile="x86-64-avx2", variant="fp32", path=path,
        runtime=agent_models.ONNX, health=agent_models.digits_health(), chunk_size=4096, compression="lzma",
    )  # fmt: skip


def _fine_tuned_pair(tmp_path: Path) -> tuple[ArtifactStore, ArtifactRecord]:
    """A store holding digits v1 and a fine-tuned v2 (sealed); returns the store and v2's artifact."""
    store = _store(tmp_path)
    v1 = real_model("digits").path
    v2 = tmp_path / "v2.onnx"
    v2.write_bytes(fine_tuned(v1))
    store.seal_build(_build(v1, 1))
    return store, store.seal_build(_build(v2, 2))


def test_delta_is_built_once_shared_and_applies(tmp_path: Path) -> None:
    store, target = _fine_tuned_pair(tmp_path)
    v1, v2 = real_model("digits").path, tmp_path / "v2.onnx"
    builder = DeltaBuilder(store)
    offer = builder.offer("digits", "x86-64-avx2", (1,), target)
    assert offer is not None and offer.base_version == 1
    assert offer.base_sha256 == hashlib.sha256(v1.read_bytes()).hexdigest()
    again = DeltaBuilder(store).offer("digits", "x86-64-avx2", (1,), target)  # another process, same registry
    assert again is not None and again.artifact.artifact_id == offer.artifact.artifact_id
    assert offer.artifact.wire_bytes < 0.6 * target.wire_bytes
    info = store.info(offer.artifact.artifact_id)
    chunks = [store.chunk(info.artifact_id, i) for i in range(info.chunk_count)]
    patch = open_artifact(chunks, offer.artifact.data_key, info, max_size=1 << 30)
    out = apply_bytes(patch, v1.read_bytes(), target_sha256=str(target.info["sha256"]), max_size=1 << 30)
    assert out == v2.read_bytes()
    assert builder.offer("digits", "x86-64-avx2", (), target) is None, "nothing kept: no delta"
    assert builder.offer("digits", "x86-64-avx2", (2, 3), target) is None, "no older version kept"


def test_unrelated_versions_get_no_delta(tmp_path: Path) -> None:
    store = _store(tmp_path)
    v1 = real_model("digits").path
    noise = tmp_path / "v2.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(len(lzma.compress(v1.read_bytes())) * 2))
    store.seal_build(_build(v1, 1))
    target = store.seal_build(_build(noise, 2))
    builder = DeltaBuilder(store)
    assert builder.offer("digits", "x86-64-avx2", (1,), target) is None
    assert builder.offer("digits", "x86-64-avx2", (1,), target) is None  # remembered, not rebuilt
    n = store.registry.db.connection().execute("SELECT COUNT(*) FROM artifacts WHERE variant = 'delta'").fetchone()[0]
    assert n == 0


class _HeldBuilder(DeltaBuilder):
    """A builder whose build waits for ``release`` (a build that takes long, without guessing a duration)."""

    def __init__(self, store: ArtifactStore, wait_s: float) -> None:
        super().__init__(store, wait_s=wait_s)
        self.release = threading.Event()
        self.started = threading.Event()
        self.builds = 0

    def _build(self, base: ArtifactRecord, target: ArtifactRecord) -> ArtifactRecord | None:
        self.builds += 1
        self.started.set()
        assert self.release.wait(30)
        return super()._build(base, target)


def test_a_slow_build_does_not_hold_the_dispatch_and_serves_later_ones(tmp_path: Path) -> None:
    store, target = _fine_tuned_pair(tmp_path)
    builder = _HeldBuilder(store, wait_s=0.0)
    try:
        assert builder.offer("digits", "x86-64-avx2", (1,), target) is None, "still building: full artifact"
        assert builder.started.wait(30)
        assert builder.offer("digits", "x86-64-avx2", (1,), target) is None  # the same build, not a second one
        builder.release.set()
        builder.wait_s = None  # the next dispatch waits for the build under way
        offer = builder.offer("digits", "x86-64-avx2", (1,), target)
        assert offer is not None and offer.base_version == 1
        assert builder.offer("digits", "x86-64-avx2", (1,), target) == offer  # done: no wait, no rebuild
        assert builder.builds == 1
    finally:
        builder.release.set()
        builder.close()
