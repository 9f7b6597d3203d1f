"""File helpers both sides use: SHA-256 of a file, fsync of a directory. Stdlib only.

The agent's durable writes (temp file, fsync, rename, directory fsync) build on these in
``agent.runtime.fsutil``; the server's artifact store, build pipeline and catalog use them directly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: Read size for hashing (large reads: hashing is bound by the disk, not by Python's loop).
HASH_BLOCK = 1 << 20


def file_hash(path: Path) -> Any:
    """The ``hashlib.sha256`` object over ``path``'s bytes (OSError as is: callers translate it)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of ``path``'s bytes."""
    return str(file_hash(path).hexdigest())


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["HASH_BLOCK", "file_hash", "file_sha256", "fsync_dir"]
