"""The model store on disk: kept versions, the active pointer, partial downloads, the journal.

Layout under ``store_dir``::

    journal.0, journal.1           the lifecycle journal, written alternately (newest valid serial wins)
    seq.floor                      the last accepted seq again, apart from the journal (anti-replay backup)
    status.json                    last StateReport + pid, for `edgefleet-agent status` (advisory: not fsynced)
    boot                           start counter (MQTT session numbers grow across restarts)
    current -> models/m/3-<art>    the committed version being served (symlink, replaced atomically)
    models/{name}/{version}-{artifact_id}/
        model.onnx | model.tflite
        meta.json                  ref, digests, runtime, health spec, staged|committed, timestamps
    partial/{artifact_id}/
        data                       the compressed artifact, written at chunk offsets (sparse)
        snapshot                   Reassembly resume snapshot (only after ``data`` is fsynced)
        desired                    the signed desired state that asked for it (re-verified on resume)

Rules: a version directory appears complete or not at all (built under a temp name, then one
rename); the current pointer and every meta/journal/snapshot write is atomic (fsutil); the
journal names the truth and ``current`` follows it (fixed up at start if a crash fell between
the two). Deleting is always safe for partial downloads and staged versions: at worst they are
fetched again. A committed version is deleted only by pruning beyond the last K, or by purge,
and never while it is the current one.

Every OSError is translated to StorageError (DiskFullError for ENOSPC) at this seam; a failed
write never touches the version that is serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from agent.core.journal import JournalRecord, State
from agent.errors import (
    DiskFullError,
    IntegrityError,
    MalformedMessageError,
    StorageError,
)
from agent.files import file_hash, fsync_dir
from agent.protocol.codec import Inflater
from agent.protocol.messages import ArtifactInfo, HealthSpec, ModelRef, RuntimeSpec, validate_model_name
from agent.runtime.fsutil import TMP_MARKER, atomic_symlink, atomic_write, storage_error

META_FORMAT = 1
READ_BLOCK = 64 * 1024
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}


@dataclass(frozen=True)
class KeptVersion:
    """One installed version (staged or committed) and everything needed to load and check it."""

    ref: ModelRef
    artifact_id: str
    directory: Path
    path: Path
    sha256: str
    size: int
    runtime: RuntimeSpec
    health: HealthSpec
    variant: str | None
    state: str  # "staged" | "committed"
    installed_at: float
    committed_at: float | None = None

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    def meta(self) -> dict[str, Any]:
        return {
            "format": META_FORMAT,
            "ref": self.ref.to_dict(),
            "artifact_id": self.artifact_id,
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "runtime": self.runtime.to_dict(),
            "health": self.health.to_dict(),
            "variant": self.variant,
            "state": self.state,
            "installed_at": self.installed_at,
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_meta(cls, directory: Path, meta: dict[str, Any]) -> KeptVersion:
        if meta.get("format") != META_FORMAT:
            raise StorageError(f"{directory}: meta format {meta.get('format')!r} is not {META_FORMAT}")
        try:
            name = str(meta["file"])
            if name not in MODEL_FILES.values():
                raise StorageError(f"{directory}: unexpected model file name {name!r}")
            return cls(
                ref=ModelRef.from_dict(meta["ref"]),
                artifact_id=str(meta["artifact_id"]),
                directory=directory,
                path=directory / name,
                sha256=str(meta["sha256"]),
                size=int(meta["size"]),
                runtime=RuntimeSpec.from_dict(meta["runtime"]),
                health=HealthSpec.from_dict(meta["health"]),
                variant=meta.get("variant"),
                state=str(meta["state"]),
                installed_at=float(meta["installed_at"]),
                committed_at=None if meta.get("committed_at") is None else float(meta["committed_at"]),
            )
        except (KeyError, TypeError, ValueError, MalformedMessageError) as exc:
            raise StorageError(f"{directory}: unreadable meta.json ({exc})") from exc


class PartialDownload:
    """The on-disk side of one transfer: random-access data file + resume snapshot (a ChunkSink)."""

    def __init__(self, directory: Path, info: ArtifactInfo) -> None:
        self.directory = directory
        self.info = info
        self.data_path = directory / "data"
        self.snapshot_path = directory / "snapshot"
        self._fd: int | None = None

    def open(self) -> PartialDownload:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(fd).st_size != self.info.compressed_size:
                os.ftruncate(fd, self.info.compressed_size)  # sparse: space is used as chunks land
            self._fd = fd
        except OSError as exc:
            raise storage_error(exc, f"cannot open partial download {self.data_path}") from exc
        return self

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # ChunkSink
    def write_at(self, offset: int, data: bytes) -> None:
        if self._fd is None:
            raise StorageError("partial download is not open")
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise storage_error(exc, f"cannot write chunk data to {self.data_path}") from exc

    def sha256(self) -> bytes:
        digest: bytes = _hash_file(self.data_path).digest()
        return digest

    def sync(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise storage_error(exc, f"cannot fsync {self.data_path}") from exc

    def read_snapshot(self) -> bytes | None:
        try:
            return self.snapshot_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc, f"cannot read {self.snapshot_path}") from exc

    def write_snapshot(self, snapshot: bytes) -> None:
        """Persist a resume snapshot; the chunk data it mentions is made durable first."""
        self.sync()
        atomic_write(self.snapshot_path, snapshot, mode=0o600)


class ModelStore:
    def __init__(
        self,
        root: Path,
        *,
        keep: int = 3,
        min_free_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.keep = keep
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self.models_dir = root / "models"
        self.partial_dir = root / "partial"
        self.current_link = root / "current"
        try:
            for d in (root, self.models_dir, self.partial_dir):
                d.mkdir(parents=True, exist_ok=True)
            root.chmod(0o700)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the model store at {root}") from exc

    # -- journal ------------------------------------------------------------------------------------

    def _journal_slots(self) -> tuple[Path, Path]:
        return self.root / "journal.0", self.root / "journal.1"

    def read_journal(self) -> tuple[JournalRecord | None, list[str]]:
        """The newest valid record of the two slots (None if there is none) and what was wrong with the rest."""
        best: JournalRecord | None = None
        problems: list[str] = []
        for slot in self._journal_slots():
            try:
                data = slot.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(f"{slot.name}: {exc.strerror or exc}")
                continue
            try:
                record = JournalRecord.from_bytes(data)
            except StorageError as exc:
                problems.append(f"{slot.name}: {exc.message}")
                continue
            if best is None or record.serial > best.serial:
                best = record
        return best, problems

    def write_journal(self, record: JournalRecord) -> None:
        atomic_write(self._journal_slots()[record.serial % 2], record.to_bytes(), mode=0o600)

    # The replay floor is kept a second time, outside the journal, so losing both journal slots does
    # not reopen the door to old signed commands. A checksum guards it: a corrupt floor read as a
    # huge number would lock the device out of every future message, so a bad file counts as absent.
    def read_seq_floor(self) -> int | None:
        try:
            text = (self.root / "seq.floor").read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 20:
            return None
        if parts[1] != f"{zlib.crc32(parts[0].encode()):08x}":
            return None
        return int(parts[0])

    def write_seq_floor(self, seq: int) -> None:
        atomic_write(self.root / "seq.floor", f"{seq} {zlib.crc32(str(seq).encode()):08x}\n".encode(), mode=0o600)

    def next_boot(self) -> int:
        """A counter that grows by one per agent start (survives restarts; starts at 1)."""
        path = self.root / "boot"
        try:
            boot = int(path.read_text().strip() or 0) + 1
        except (FileNotFoundError, ValueError):
            boot = 1
        except OSError as exc:
            raise storage_error(exc, f"cannot read {path}") from exc
        atomic_write(path, f"{boot}\n".encode())
        return boot

    def write_status(self, status: dict[str, Any]) -> None:
        # advisory (read by `edgefleet-agent status` and tests, rewritten at every transition): not fsynced
        atomic_write(self.root / "status.json", json.dumps(status, sort_keys=True).encode(), durable=False)

    def read_status(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_last_desired(self, blob: bytes) -> None:
        """The last accepted signed desired state (its expiry is reported; re-verified when read)."""
        atomic_write(self.root / "desired", blob, mode=0o600)

    def load_last_desired(self) -> bytes | None:
        try:
            return (self.root / "desired").read_bytes()
        except OSError:
            return None

    # -- space -----------------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError as exc:
            raise storage_error(exc, f"cannot stat {self.root}") from exc

    def require_space(self, needed: int, what: str) -> None:
        """DiskFullError unless ``needed`` bytes fit and leave ``min_free_bytes`` free."""
        free = self.free_bytes()
        if free - needed < self.min_free_bytes:
            raise DiskFullError(f"{what} needs {needed} bytes; {free} free and {self.min_free_bytes} must stay free")

    # -- partial downloads -----------------------------------------------------------------------------

    def partial(self, info: ArtifactInfo) -> PartialDownload:
        return PartialDownload(self.partial_dir / info.artifact_id, info)

    def save_desired(self, artifact_id: str, blob: bytes) -> None:
        directory = self.partial_dir / artifact_id
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create {directory}") from exc
        atomic_write(directory / "desired", blob, mode=0o600)

    def load_desired(self, artifact_id: str) -> bytes:
        path = self.partial_dir / artifact_id / "desired"
        try:
            return path.read_bytes()
        except OSError as exc:
            raise storage_error(exc, f"the desired state of artifact {artifact_id} is gone") from exc

    def discard_partial(self, artifact_id: str) -> None:
        _remove_tree(self.partial_dir / artifact_id)

    # -- installing ------------------------------------------------------------------------------------

    def install(
        self,
        *,
        ref: ModelRef,
        info: ArtifactInfo,
        runtime: RuntimeSpec,
        health: HealthSpec,
        variant: str | None,
        source: Path,
    ) -> KeptVersion:
        """Decompress ``source`` (the verified compressed artifact) into a new staged version directory.

        Streams with bounded memory; the output may never exceed ``info.size`` and must match
        ``info.sha256``. Raises IntegrityError / ArtifactTooLargeError / StorageError; on any
        failure nothing is left behind.
        """
        self.require_space(info.size, f"installing {ref.name} v{ref.version}")
        final = self.models_dir / validate_model_name(ref.name) / f"{ref.version}-{info.artifact_id}"
        building = final.with_name(f"{final.name}{TMP_MARKER}{os.getpid()}")
        model_file = MODEL_FILES[runtime.format]
        try:
            _remove_tree(building)
            building.mkdir(parents=True)
            with source.open("rb") as src, (building / model_file).open("wb") as dst:
                digest = _decompress_stream(src, dst, info.compression, info.size)
                dst.flush()
                os.fsync(dst.fileno())
            if digest != info.sha256:
                raise IntegrityError(f"{ref.name} v{ref.version}: model digest does not match the manifest")  # noqa: TRY301
            kept = KeptVersion(
                ref=ref,
                artifact_id=info.artifact_id,
                directory=final,
                path=final / model_file,
                sha256=digest,
                size=info.size,
                runtime=runtime,
                health=health,
                variant=variant,
                state="staged",
                installed_at=self.clock(),
            )
            atomic_write(building / "meta.json", json.dumps(kept.meta(), sort_keys=True).encode())
            if final.exists():  # an earlier install of the same artifact (not the current one: same id)
                if self._is_current(final):
                    _remove_tree(building)
                    return self._read_version(final)
                _remove_tree(final)
            building.replace(final)
            fsync_dir(final.parent)
        except OSError as exc:
            _remove_tree(building)
            raise storage_error(exc, f"cannot install {ref.name} v{ref.version}") from exc
        except Exception:
            _remove_tree(building)
            raise
        return kept

    # -- reading ---------------------------------------------------------------------------------------

    def _read_version(self, directory: Path) -> KeptVersion:
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise StorageError(f"{directory}: cannot read meta.json ({exc})") from exc
        if not isinstance(meta, dict):
            raise StorageError(f"{directory}: meta.json is not an object")
        return KeptVersion.from_meta(directory, meta)

    def versions(self) -> list[KeptVersion]:
        """Every installed version (staged and committed); unreadable ones are skipped."""
        out: list[KeptVersion] = []
        for directory in self._version_dirs():
            with contextlib.suppress(StorageError):
                out.append(self._read_version(directory))
        return out

    def _version_dirs(self) -> Iterator[Path]:
        if not self.models_dir.exists():
            return
        for model_dir in sorted(self.models_dir.iterdir()):
            if not model_dir.is_dir() or TMP_MARKER in model_dir.name:
                continue
            for directory in sorted(model_dir.iterdir()):
                if directory.is_dir() and TMP_MARKER not in directory.name:
                    yield directory

    def kept(self, name: str | None = None) -> list[KeptVersion]:
        """Committed versions, most recently committed first (optionally of one model)."""
        committed = [v for v in self.versions() if v.committed and (name is None or v.ref.name == name)]
        return sorted(committed, key=lambda v: v.committed_at or 0.0, reverse=True)

    def committed_refs(self, name: str | None = None) -> list[ModelRef]:
        """``kept`` as references (what agent.core.intake asks of a store)."""
        return [v.ref for v in self.kept(name)]

    def committed_artifact(self, ref: ModelRef) -> str | None:
        """The artifact id of the newest committed install of ``ref`` (None when not kept)."""
        kept = self.find(ref, committed_only=True)
        return kept.artifact_id if kept is not None else None

    def find(self, ref: ModelRef, *, committed_only: bool = False) -> KeptVersion | None:
        """The newest install of ``ref`` (a fresh staged one wins over an older committed one)."""
        matches = [v for v in self.versions() if v.ref == ref and (v.committed or not committed_only)]
        return max(matches, key=lambda v: v.installed_at) if matches else None

    def current(self) -> KeptVersion | None:
        try:
            target = self.current_link.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            return None
        try:
            return self._read_version(target)
        except StorageError:
            return None

    def _is_current(self, directory: Path) -> bool:
        try:
            return self.current_link.resolve(strict=True) == directory.resolve()
        except (FileNotFoundError, RuntimeError, OSError):
            return False

    def verify_file(self, version: KeptVersion) -> None:
        """IntegrityError if the model file on disk is not the one that was installed (bit rot, tampering)."""
        try:
            digest = _hash_file(version.path).hexdigest()
        except StorageError as exc:
            raise IntegrityError(f"{version.ref.name} v{version.ref.version}: {exc.message}") from exc
        if digest != version.sha256:
            raise IntegrityError(f"{version.ref.name} v{version.ref.version}: model file changed on disk")

    # -- committing, pruning, purging ---------------------------------------------------------------------

    def commit(self, ref: ModelRef) -> KeptVersion:
        """Mark ``ref`` committed, point ``current`` at it, prune to the last ``keep`` committed versions."""
        version = self.find(ref)
        if version is None:
            raise StorageError(f"{ref.name} v{ref.version} is not installed")
        if not version.committed or version.committed_at is None:
            version = replace(version, state="committed", committed_at=self.clock())
        else:
            version = replace(version, committed_at=max(version.committed_at, self.clock()))
        atomic_write(version.directory / "meta.json", json.dumps(version.meta(), sort_keys=True).encode())
        self.point_current(version)
        self.prune()
        return version

    def point_current(self, version: KeptVersion) -> None:
        if not self._is_current(version.directory):
            atomic_symlink(self.current_link, os.path.relpath(version.directory, self.root))

    def prune(self) -> list[KeptVersion]:
        """Delete committed versions beyond the last ``keep`` (the current one always counts as kept)."""
        committed = self.kept()
        current = self.current()
        keep_dirs: set[Path] = set()
        refs: list[ModelRef] = []
        if current is not None:
            keep_dirs.add(current.directory)
            refs.append(current.ref)
        for version in committed:
            if version.ref not in refs and len(refs) < self.keep:
                refs.append(version.ref)
                keep_dirs.add(version.directory)
        removed = [v for v in committed if v.directory not in keep_dirs]
        for version in removed:
            self.remove(version)
        return removed

    def remove(self, version: KeptVersion) -> None:
        if self._is_current(version.directory):
            raise StorageError(f"refusing to delete {version.ref.name} v{version.ref.version}: it is current")
        _remove_tree(version.directory)

    def purge(self, *, keep: set[ModelRef]) -> list[KeptVersion]:
        """Delete every committed version except ``keep`` and the current one."""
        removed = []
        for version in self.kept():
            if version.ref in keep or self._is_current(version.directory):
                continue
            self.remove(version)
            removed.append(version)
        return removed

    def discard_staged(self, ref: ModelRef) -> None:
        """Delete staged (never committed) installs of ``ref``; committed ones stay."""
        for version in self.versions():
            if version.ref == ref and not version.committed and not self._is_current(version.directory):
                _remove_tree(version.directory)

    # -- after a crash -----------------------------------------------------------------------------------------

    def cleanup(self, record: JournalRecord) -> list[str]:
        """Remove what a dead process left behind and the journal no longer refers to; returns what went."""
        removed: list[str] = []
        for path in list(self.root.rglob(f"*{TMP_MARKER}*")):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    _remove_tree(path)
                else:
                    path.unlink()
                removed.append(str(path.relative_to(self.root)))
        live_artifact = record.artifact_id if record.state in (State.DOWNLOADING, State.VERIFYING) else None
        if self.partial_dir.exists():
            for directory in self.partial_dir.iterdir():
                if directory.name != live_artifact:
                    _remove_tree(directory)
                    removed.append(str(directory.relative_to(self.root)))
        live_target = record.target if record.state in (State.STAGED, State.WARMING, State.PROBATION) else None
        # A crash between the journal's commit and the store's can leave the committed version marked staged:
        # the journal wins (the agent serves it and then fixes the store), so it must not be swept here.
        spared = {live_target, record.committed}
        for version in self.versions():
            if not version.committed and version.ref not in spared and not self._is_current(version.directory):
                _remove_tree(version.directory)
                removed.append(str(version.directory.relative_to(self.root)))
        return removed


# -- helpers ----------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage_error(exc, f"cannot remove {path}") from exc


def _hash_file(path: Path) -> Any:
    try:
        return file_hash(path)
    except OSError as exc:
        raise storage_error(exc, f"cannot read {path}") from exc


def _decompress_stream(src: BinaryIO, dst: BinaryIO, method: str, expected_size: int) -> str:
    """Undo the artifact's compression with bounded memory; returns the SHA-256 hex of the output."""
    digest = hashlib.sha256()
    inflater = Inflater(method, expected_size)
    while block := src.read(READ_BLOCK):
        for out in inflater.feed(block):
            digest.update(out)
            dst.write(out)
    tail = inflater.finish()
    digest.update(tail)
    dst.write(tail)
    return digest.hexdigest()
