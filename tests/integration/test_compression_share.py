"""One build command, several profiles: identical candidates are made and measured once, and the fp32
reference outputs are kept on disk per model version and evaluation data (digits, the real model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.build_ops import build_share, build_variant
from server.compression.pipeline import BuildOptions
from server.compression.share import BuildShare
from server.profiles import get_profile
from server.registry.catalog import Catalog
from tests.support.models import real_model

OPTIONS = BuildOptions(methods=("minmax",), latency_runs=3)
# S8S8 int8 for both Pis; U8S8 on x86 (ORT's fused x86 kernels), with reduce_range without VNNI
PROFILES = ("raspberry-pi-4", "raspberry-pi-5", "x86-64-vnni", "x86-64-avx2")


def test_profiles_share_identical_candidates_and_the_reference(tmp_path: Path) -> None:
    digits = real_model("digits")
    catalog = Catalog.open(tmp_path / "home")
    mv = catalog.add_model(digits.path, "digits", calibration=digits.calibration, evaluation=digits.evaluation)
    steps: dict[str, list[str]] = {}
    with build_share(catalog.paths) as share:
        results = {}
        for pid in PROFILES:
            steps[pid] = []
            _, results[pid] = build_variant(catalog, mv, get_profile(pid), options=OPTIONS, progress=steps[pid].append,
                                            share=share)
        assert share.hits > 0
        work = share.dir
    assert not work.exists()  # the share's files go when the command ends; the stored builds stay
    for pid in PROFILES:
        stored = catalog.get_build("digits", 1, pid)
        assert stored is not None and stored.path.is_file()

    def cands(pid: str) -> dict[str, tuple[str, float | None]]:
        return {c.recipe.name: (c.sha256, c.fidelity.value if c.fidelity else None)
                for c in results[pid].candidates if c.status != "error"}

    pi4, pi5, vnni, avx2 = (cands(p) for p in PROFILES)
    # the same recipe with the same parameters: the same file and the same measurement
    assert pi4["int8-static-minmax"] == pi5["int8-static-minmax"]
    assert pi4["fp32"] == avx2["fp32"] and pi4["fp16-weights"] == avx2["fp16-weights"]
    # a different flavour is a different candidate (U8S8 on x86; reduce_range without VNNI)
    assert len({pi4["int8-static-minmax"][0], vnni["int8-static-minmax"][0], avx2["int8-static-minmax"][0]}) == 3
    # the reference ran once; later profiles (and later builds) take it from the share or the disk
    assert steps[PROFILES[0]][0] == "reference outputs (fp32)"
    assert all(s[0] == "reference outputs (fp32, cached)" for p, s in steps.items() if p != PROFILES[0])
    cached = list((tmp_path / "home" / "cache" / "reference").glob("*.npz"))
    assert len(cached) == 1
    rebuild: list[str] = []
    build_variant(catalog, mv, get_profile("x86-64-vnni"), options=OPTIONS, progress=rebuild.append)
    assert rebuild[0] == "reference outputs (fp32, cached)"
    # a corrupt cache file is recomputed, not trusted
    cached[0].write_bytes(b"not an npz")
    again: list[str] = []
    build_variant(catalog, mv, get_profile("x86-64-vnni"), options=OPTIONS, progress=again.append)
    assert again[0] == "reference outputs (fp32)"


def test_reference_round_trip_and_size_cap(tmp_path: Path) -> None:
    share = BuildShare(tmp_path / "work", tmp_path / "ref")
    outs: list[np.ndarray] = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((3, 2, 2), dtype=np.float16)]
    share.put_reference("k", outs, persist=True)
    fresh = BuildShare(tmp_path / "work", tmp_path / "ref")
    got = fresh.reference("k")
    assert isinstance(got, list)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, outs, strict=True))
    share.put_reference("synthetic", "fp32 not run", persist=True)  # a refusal is kept in memory only
    assert fresh.reference("synthetic") is None and share.reference("synthetic") == "fp32 not run"
