"""The model store on real files: install, commit, prune, pointer, partial downloads, cleanup, journal slots."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest

from agent.core.journal import JournalRecord, State
from agent.core.reassembly import Reassembly
from agent.errors import ArtifactTooLargeError, ConfigError, DiskFullError, IntegrityError, StorageError
from agent.protocol.envelope import ChunkOpener, seal_artifact
from agent.protocol.messages import ArtifactInfo, HealthSpec, ModelRef, RuntimeSpec, TensorSpec
from agent.runtime import fsutil
from agent.runtime.keys import fingerprint, generate_device_key, load_device_key
from agent.runtime.store import ModelStore

RUNTIME = RuntimeSpec(format="onnx", runtime="onnxruntime")
HEALTH = HealthSpec(
    inputs=(TensorSpec("x", "float32", (1, 4)),), outputs=(TensorSpec("y", "float32", (1, 2)),), latency_budget_ms=10
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def model_bytes(version: int) -> bytes:
    # realistic enough for the store: it never parses the model, only moves and hashes it
    return hashlib.sha256(str(version).encode()).digest() * 4000 + bytes([version]) * 1000


def download(store: ModelStore, model: bytes, compression: str = "lzma") -> tuple[ArtifactInfo, Path]:
    """Run a whole transfer through the partial-download path, as the agent does."""
    sealed = seal_artifact(model, chunk_size=4096, compression=compression)
    info = sealed.info
    partial = store.partial(info).open()
    reassembly = Reassembly.for_artifact(info, max_bytes=1 << 30)
    opener = ChunkOpener(sealed.data_key, info)
    for wire in reversed(sealed.chunks):
        opened = opener.open_chunk(wire)
        reassembly.add(opened.index, opened.data, partial, fingerprint=opened.tag)
    partial.write_snapshot(reassembly.to_bytes())
    reassembly.finish(partial)
    partial.close()
    return info, partial.data_path


def install(store: ModelStore, version: int, compression: str = "lzma") -> None:
    info, source = download(store, model_bytes(version), compression)
    store.install(ref=ModelRef("m", version), info=info, runtime=RUNTIME, health=HEALTH, variant=None, source=source)
    store.discard_partial(info.artifact_id)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", keep=2, clock=Clock())


@pytest.mark.parametrize("compression", ["none", "zlib", "lzma"])
def test_install_stages_a_verified_copy(store: ModelStore, compression: str) -> None:
    install(store, 1, compression)
    (version,) = store.versions()
    assert version.state == "staged" and not version.committed
    assert version.path.read_bytes() == model_bytes(1)
    assert version.health == HEALTH and version.runtime == RUNTIME
    store.verify_file(version)
    assert store.kept() == [] and store.current() is None


def test_commit_moves_the_pointer_and_prunes_to_k(store: ModelStore) -> None:
    for v in (1, 2, 3):
        install(store, v)
        store.commit(ModelRef("m", v))
        assert store.current() is not None and store.current().ref == ModelRef("m", v)  # type: ignore[union-attr]
    assert [k.ref.version for k in store.kept()] == [3, 2], "keep=2: the oldest committed version is gone"
    assert os.readlink(store.current_link).startswith("models/m/3-"), "a relative pointer survives moving the store"
    # rolling back to a kept version re-commits it and leaves it current
    store.commit(ModelRef("m", 2))
    assert [k.ref.version for k in store.kept()] == [2, 3]
    with pytest.raises(StorageError, match="current"):
        store.remove(store.current())  # type: ignore[arg-type]


def test_purge_and_discard_staged_spare_what_serves(store: ModelStore) -> None:
    for v in (1, 2):
        install(store, v)
        store.commit(ModelRef("m", v))
    install(store, 3)
    store.discard_staged(ModelRef("m", 3))
    store.discard_staged(ModelRef("m", 2))  # committed: stays
    assert sorted(v.ref.version for v in store.versions()) == [1, 2]
    removed = store.purge(keep=set())
    assert [v.ref.version for v in removed] == [1]
    assert [v.ref.version for v in store.kept()] == [2]


def test_tampered_or_oversized_artifacts_never_install(store: ModelStore) -> None:
    info, source = download(store, model_bytes(1))
    liar = ArtifactInfo(**{**info.__dict__, "sha256": "0" * 64})
    with pytest.raises(IntegrityError):
        store.install(ref=ModelRef("m", 1), info=liar, runtime=RUNTIME, health=HEALTH, variant=None, source=source)
    small = ArtifactInfo(**{**info.__dict__, "size": info.size - 10})
    with pytest.raises(ArtifactTooLargeError):
        store.install(ref=ModelRef("m", 1), info=small, runtime=RUNTIME, health=HEALTH, variant=None, source=source)
    assert store.versions() == []
    assert not list((store.models_dir / "m").iterdir()), "no half-built version directory is left"


def test_a_changed_model_file_is_detected(store: ModelStore) -> None:
    install(store, 1)
    (version,) = store.versions()
    version.path.write_bytes(b"\x00" + version.path.read_bytes()[1:])
    with pytest.raises(IntegrityError, match="changed on disk"):
        store.verify_file(version)


def test_free_space_floor_is_a_disk_full_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "s", min_free_bytes=1 << 60)
    with pytest.raises(DiskFullError) as info:
        store.require_space(1, "test")
    assert info.value.code == "disk_full"


def test_enospc_is_translated_and_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "journal.0"
    target.write_bytes(b"old")
    real_write = os.write

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(DiskFullError):
        fsutil.atomic_write(target, b"new")
    monkeypatch.setattr(os, "write", real_write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["journal.0"], "the temp file was removed"


def test_journal_slots_alternate_and_the_newest_valid_wins(store: ModelStore) -> None:
    assert store.read_journal() == (None, [])
    first = JournalRecord(serial=1, committed=ModelRef("m", 1))
    second = first.next(state=State.DOWNLOADING, target=ModelRef("m", 2), artifact_id="ab" * 16)
    store.write_journal(first)
    store.write_journal(second)
    assert store.read_journal() == (second, [])
    (store.root / f"journal.{second.serial % 2}").write_bytes(b"EFJ1 torn")
    record, problems = store.read_journal()
    assert record == first, "a damaged newest slot falls back to the previous record"
    assert problems and "journal." in problems[0]


def test_cleanup_after_power_loss(store: ModelStore) -> None:
    install(store, 1)
    store.commit(ModelRef("m", 1))
    install(store, 2)  # staged, then the power went
    info, _ = download(store, model_bytes(3))  # a partial download nobody refers to any more
    (store.root / f"journal.0{fsutil.TMP_MARKER}123").write_bytes(b"half")
    (store.models_dir / "m" / f"4-x{fsutil.TMP_MARKER}9").mkdir()
    removed = store.cleanup(JournalRecord(state=State.IDLE, committed=ModelRef("m", 1)))
    assert len(removed) == 4, removed
    assert [v.ref.version for v in store.versions()] == [1]
    assert not list(store.partial_dir.iterdir())
    # a download the journal still refers to is kept for resume
    info, _ = download(store, model_bytes(5))
    record = JournalRecord(state=State.DOWNLOADING, target=ModelRef("m", 5), artifact_id=info.artifact_id)
    assert store.cleanup(record) == []
    assert (store.partial_dir / info.artifact_id / "snapshot").exists()


def test_cleanup_spares_what_the_journal_committed_before_the_store_did(store: ModelStore) -> None:
    install(store, 1)
    store.commit(ModelRef("m", 1))
    install(store, 2)  # the journal committed v2, then the power went before the store's commit
    assert store.cleanup(JournalRecord(state=State.IDLE, committed=ModelRef("m", 2))) == []
    assert sorted(v.ref.version for v in store.versions()) == [1, 2]
    store.commit(ModelRef("m", 2))  # what the agent does once v2 serves
    current = store.current()
    assert current is not None and current.ref == ModelRef("m", 2)


def test_device_key_is_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    key = generate_device_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_device_key(path).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    assert len(fingerprint(key.public_key())) == 16
    with pytest.raises(ConfigError, match="refusing"):
        generate_device_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_device_key(path)


def test_seq_floor_round_trips_and_a_damaged_one_counts_as_absent(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.read_seq_floor() is None
    store.write_seq_floor(12345)
    assert store.read_seq_floor() == 12345
    path = tmp_path / "store" / "seq.floor"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    good = path.read_bytes()
    path.write_bytes(b"99999" + good[5:])  # a flipped digit must not become a floor that locks the device out
    assert store.read_seq_floor() is None
    path.write_bytes(good[:3])  # torn
    assert store.read_seq_floor() is None
    path.write_bytes(b"\xff\xfe")
    assert store.read_seq_floor() is None


def test_status_json_is_replaced_whole_without_fsyncs(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """status.json is advisory and rewritten at every transition on the agent's thread: no fsync (a busy disk made
    each one 10-20 ms, stalling a download's first chunks); durable writes still fsync the data and the directory."""
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    store.write_status({"state": "downloading"})
    assert store.read_status() == {"state": "downloading"}
    assert synced == []
    assert not [p for p in store.root.iterdir() if fsutil.TMP_MARKER in p.name]
    fsutil.atomic_write(store.root / "durable", b"x")
    assert len(synced) == 2  # the temp file, then the directory after the rename
