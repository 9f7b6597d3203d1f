"""Sealed artifacts on disk, content-addressed, readable chunk by chunk by any server process.

One artifact = one model variant compressed, split and encrypted under a random data key
(``agent.protocol.envelope.seal_artifact``). Its wire chunks are stored back to back in
``{artifacts_dir}/{artifact_id[:2]}/{artifact_id}.efa``; every chunk but the last has the same
length, so chunk ``i`` is one ``pread`` at ``i * (header + chunk_size + tag)``. The same content
(model SHA-256, chunk size, compression) is sealed once and reused by later deployments, so
a re-deploy or a late joiner never re-encrypts, and the registry row (with the data key) is
what every server process shares.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from agent.files import file_sha256
from agent.protocol.envelope import CHUNK_HEADER_SIZE, TAG_SIZE, seal_artifact
from agent.protocol.messages import ArtifactInfo
from server.builds import BuildLike
from server.errors import ModelError, RegistryError
from server.keys import atomic_write
from server.registry.fleet import ArtifactRecord, FleetRegistry

#: Largest model file the server seals (the agent caps what it accepts separately).
MAX_MODEL_BYTES = 2 * 1024**3


def content_key(model_sha256: str, chunk_size: int, compression: str) -> str:
    return f"{model_sha256}:{chunk_size}:{compression}"


class ArtifactStore:
    """Seal builds into artifacts and serve their chunks."""

    def __init__(self, root: Path, registry: FleetRegistry, *, max_open: int = 32) -> None:
        self.root = root
        self.registry = registry
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open
        self._info: dict[str, ArtifactInfo] = {}

    def path(self, artifact_id: str) -> Path:
        return self.root / artifact_id[:2] / f"{artifact_id}.efa"

    def seal_build(self, build: BuildLike) -> ArtifactRecord:
        """The artifact for ``build``'s file: reused if this content was sealed before, else sealed now."""
        try:
            size = build.path.stat().st_size
        except OSError as exc:
            raise ModelError(f"build file {build.path} for profile {build.profile} is unreadable: {exc}") from exc
        if size > MAX_MODEL_BYTES:
            raise ModelError(f"build file {build.path} is {size} bytes, over the {MAX_MODEL_BYTES}-byte limit")
        digest = file_sha256(build.path)
        key = content_key(digest, build.chunk_size, build.compression)
        existing = self.registry.find_artifact(key)
        if existing is not None and self.path(existing.artifact_id).exists():
            return existing
        sealed = seal_artifact(
            build.path.read_bytes(), chunk_size=build.chunk_size, compression=build.compression, shared_topic=False
        )
        if sealed.info.sha256 != digest:
            raise ModelError(f"build file {build.path} changed while it was being sealed")
        atomic_write(self.path(sealed.info.artifact_id), b"".join(sealed.chunks))
        record = ArtifactRecord(
            artifact_id=sealed.info.artifact_id,
            content_key=key,
            model=build.model,
            version=build.version,
            profile=build.profile,
            variant=build.variant,
            info=sealed.info.to_dict(),
            data_key=sealed.data_key,
            wire_bytes=sealed.wire_bytes,
            created_at=time.time(),
        )
        stored = self.registry.put_artifact(record)
        if stored.artifact_id != record.artifact_id:  # another process sealed it first: use theirs
            self.path(record.artifact_id).unlink(missing_ok=True)
        return stored

    def info(self, artifact_id: str) -> ArtifactInfo:
        info = self._info.get(artifact_id)
        if info is None:
            info = ArtifactInfo.from_dict(self.registry.get_artifact(artifact_id).info)
            self._info[artifact_id] = info
        return info

    def chunk(self, artifact_id: str, index: int) -> bytes:
        """The sealed wire bytes of chunk ``index`` (header + ciphertext + tag)."""
        info = self.info(artifact_id)
        if not 0 <= index < info.chunk_count:
            raise RegistryError(f"chunk {index} outside artifact {artifact_id} ({info.chunk_count} chunks)")
        stride = CHUNK_HEADER_SIZE + info.chunk_size + TAG_SIZE
        plain = info.chunk_size if index < info.chunk_count - 1 else info.compressed_size - index * info.chunk_size
        length = CHUNK_HEADER_SIZE + plain + TAG_SIZE
        with self._lock:  # under the lock: an evicted descriptor must not be closed mid-read
            data = os.pread(self._fd(artifact_id), length, index * stride)
        if len(data) != length:
            raise RegistryError(f"artifact file for {artifact_id} is truncated at chunk {index}")
        return data

    def _fd(self, artifact_id: str) -> int:
        fd = self._fds.get(artifact_id)
        if fd is not None:
            self._fds.move_to_end(artifact_id)
            return fd
        try:
            fd = os.open(self.path(artifact_id), os.O_RDONLY)
        except OSError as exc:
            raise RegistryError(f"artifact file for {artifact_id} is missing: {exc}") from exc
        self._fds[artifact_id] = fd
        while len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
