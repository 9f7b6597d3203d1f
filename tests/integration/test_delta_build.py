"""Delta-friendly quantization in the catalog: digits:2 (a fine-tuned head) is quantized with digits:1's scales,
so the tensor delta between the two real int8 builds is small and applies back to the exact build."""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from agent.protocol.delta import apply_bytes
from server.build_ops import build_variant
from server.compression.pipeline import BuildOptions
from server.delta import make_delta
from server.profiles import get_profile
from server.registry.catalog import Catalog
from tests.support.models import real_model

FAST = BuildOptions(methods=("minmax",), latency_runs=3, pruning=False)


def fine_tuned(src: Path, dst: Path) -> Path:
    """Every weight nudged by ~0.5 % (a short fine-tune's footprint), seeded."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        nudged = (w * (1 + rng.normal(0, 0.005, w.shape))).astype(w.dtype)
        init.CopyFrom(numpy_helper.from_array(nudged, init.name))
    onnx.save(model, str(dst))
    return dst


def test_next_version_reuses_scales_and_ships_a_small_delta(tmp_path: Path) -> None:
    digits = real_model("digits")
    catalog = Catalog.open(tmp_path / "home")
    profile = get_profile("x86-64-avx2")
    v1 = catalog.add_model(digits.path, "digits", calibration=digits.calibration, evaluation=digits.evaluation)
    b1, _ = build_variant(catalog, v1, profile, options=FAST)
    v2 = catalog.add_model(fine_tuned(digits.path, tmp_path / "v2.onnx"), "digits", calibration=digits.calibration,
                           evaluation=digits.evaluation)  # fmt: skip
    assert v2.version == 2
    b2, result = build_variant(catalog, v2, profile, options=FAST)
    assert b1.variant.startswith("int8") and b2.variant.startswith("int8"), result.provenance["candidates"]
    notes = result.provenance["notes"]
    assert any("scales reused from the previous version" in n for n in notes), notes
    base, target = b1.path.read_bytes(), b2.path.read_bytes()
    assert base != target
    patch = make_delta(base, target, "onnx")
    full = len(lzma.compress(target))
    assert len(patch) <= 0.35 * full, (len(patch), full)
    assert apply_bytes(patch, base, target_sha256=hashlib.sha256(target).hexdigest(), max_size=1 << 30) == target
