"""Hostile inputs for the abuse scenarios: data-set bombs and the like (built without allocating them)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def npz_bomb(path: Path, name: str, shape: tuple[int, ...], dtype: str = "float32", *,
             lie_size: int | None = None) -> Path:
    """A valid ``.npz`` whose array ``name`` is all zeros of ``shape``: a few MB on disk, any size inflated.

    Written in 1 MiB blocks, so building it never holds the array. With ``lie_size`` the .npy header
    declares that many rows instead (a header that disagrees with the member's size)."""
    header_shape = (lie_size, *shape[1:]) if lie_size is not None else shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": header_shape}
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, \
            zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        left = total
        while left > 0:
            n = min(left, len(block))
            member.write(block[:n])
            left -= n
    return path


def local_service(home: Path) -> Any:
    """A server home with its signing key, and the FleetService the local CLI uses on it (no builds)."""
    from server.artifacts import ArtifactStore
    from server.builds import NoBuilds
    from server.config import load_config
    from server.keys import init_signing_key
    from server.registry.fleet import open_registry
    from server.service import FleetService

    init_signing_key(load_config(home).paths)
    config = load_config(home)
    registry = open_registry(config)
    return FleetService(config, registry, builds=NoBuilds(),
                        artifacts=ArtifactStore(config.paths.artifacts_dir, registry))


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until the broker ``proc`` accepts connections on loopback ``port`` (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mosquitto exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError("mosquitto did not listen")
