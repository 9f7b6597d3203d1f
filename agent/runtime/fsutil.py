"""Durable file writes: temp file, fsync, rename, fsync of the directory (balena's writeFileAtomic).

After ``atomic_write`` returns, a power cut leaves either the old file or the new one, never a
mix, and the rename itself is on disk. Temp files carry ``TMP_MARKER`` in their name so a start
after a crash can sweep the ones a dead process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from agent.errors import DiskFullError, StorageError
from agent.files import fsync_dir
from agent.runtime import faults

TMP_MARKER = ".tmp-"


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError at the seam; a full disk gets its own type so it can be reported as such."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFullError(f"{what}: {exc.strerror or exc}")
    return StorageError(f"{what}: {exc.strerror or exc}")


@contextlib.contextmanager
def _replacing(path: Path, what: str, *, durable: bool = True) -> Iterator[Path]:
    """A temp path beside ``path`` for the body to fill; then renamed over ``path`` and (``durable``) the directory
    synced. An OSError removes the temp file and raises StorageError (DiskFullError) naming ``what``."""
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(exc, what) from exc


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` durably; StorageError (DiskFullError) on failure, old file intact.

    ``durable=False`` is for advisory files (``status.json``) written on the agent's thread at every transition:
    readers still see the old file or the new one whole, but neither the data nor the rename is fsynced, so a
    power cut may leave the previous version (or, on some file systems, an empty file). It saves the two fsyncs
    (10-20 ms each on a busy disk) that otherwise stall the chunk stream at a download's start."""
    with _replacing(path, f"cannot write {path}", durable=durable) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; keys must end up exactly 0600
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("write:tmp")


def atomic_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` with one rename (readers see the old target or the new one)."""
    with _replacing(link, f"cannot point {link} at {target}") as tmp:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target)


def sweep_temp_files(directory: Path) -> list[Path]:
    """Remove temp files left by a process that died mid-write (any depth); returns what was removed."""
    removed: list[Path] = []
    if not directory.exists():
        return removed
    for path in directory.rglob(f"*{TMP_MARKER}*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                continue
            path.unlink()
            removed.append(path)
    return removed
