"""Data-set bombs: every .npz member's declared size, dtype and shape are checked before inflating."""

from __future__ import annotations

import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.protocol.messages import TensorSpec
from server.compression.data import MAX_INFLATED_BYTES, check_npz, load_dataset
from server.errors import DatasetError
from tests.support.abuse import npz_bomb

INPUTS = [TensorSpec("pixels", "float32", (-1, 1, 8, 8))]


def test_a_small_file_that_inflates_past_the_cap_is_refused_before_inflating(tmp_path: Path) -> None:
    rows = MAX_INFLATED_BYTES // 256 + 1024  # just over the cap
    bomb = npz_bomb(tmp_path / "bomb.npz", "pixels", (rows, 1, 8, 8))
    assert bomb.stat().st_size < MAX_INFLATED_BYTES // 100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError, match="before inflating"):
        load_dataset(bomb, INPUTS)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB"


def test_a_header_that_disagrees_with_the_member_size_is_refused(tmp_path: Path) -> None:
    liar = npz_bomb(tmp_path / "liar.npz", "pixels", (16, 1, 8, 8), lie_size=4096)
    with pytest.raises(DatasetError, match="header says"):
        check_npz(liar)


@pytest.mark.parametrize("what", ["object", "too_many_samples", "not_npy", "rank"])
def test_members_outside_the_caps_are_refused(tmp_path: Path, what: str) -> None:
    path = tmp_path / f"{what}.npz"
    if what == "object":
        with zipfile.ZipFile(path, "w") as zf, zf.open("pixels.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
            f.write(b"\0" * 8)
    elif what == "too_many_samples":
        npz_bomb(path, "pixels", (100_001, 1))
    elif what == "not_npy":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("../evil", b"x")
    else:
        np.savez(path, pixels=np.zeros((1,) * 9, np.float32))
    with pytest.raises(DatasetError):
        check_npz(path)


def test_an_ordinary_data_set_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, pixels=np.ones((10, 1, 8, 8), np.float32), labels=np.arange(10))
    ds = load_dataset(path, INPUTS)
    assert ds.samples == 10 and ds.labels is not None
