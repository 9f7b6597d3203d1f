"""Hostile inputs for the abuse scenarios: data-set bombs and the like (built without allocating them)."""

from __future__ import annotations

import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.waiting import wait_progress


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


def start_mosquitto(configure: Callable[[int], Path], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port with the config ``configure(port)`` writes (it returns its path).

    Returns ``(process, port)`` once that mosquitto itself listens on the port (``server.broker.listens``:
    a connection would also reach another process that took the port). A port is free only when picked:
    when mosquitto exits with "Address already in use", another is picked and configured (5 tries); any
    other exit fails at once with what it logged (``log``)."""
    from server.broker import find_mosquitto, free_port, listens

    for attempt in range(1, 6):
        port = free_port()
        conf = configure(port)
        with log.open("ab") as out:
            offset = out.tell()
            proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=out, stderr=out,
                                    start_new_session=True)
        try:
            wait_progress(lambda: proc.poll() is not None or listens(proc.pid, "127.0.0.1", port),  # noqa: B023
                          what=f"mosquitto listening on 127.0.0.1:{port}", progress=lambda: None, stall_s=120.0,
                          describe=lambda: log.read_text(errors="replace")[-2000:], interval_s=0.02)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.poll() is None:
            return proc, port
        said = log.read_bytes()[offset:].decode(errors="replace")
        if "Address already in use" not in said or attempt == 5:
            raise AssertionError(f"mosquitto exited with {proc.returncode} (port {port}):\n{said}")
    raise AssertionError("unreachable")
