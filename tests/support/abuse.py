"""Hostile inputs for the abuse scenarios: data-set bombs and the like (built without allocating them)."""

from __future__ import annotations

import zipfile
from pathlib import Path

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
