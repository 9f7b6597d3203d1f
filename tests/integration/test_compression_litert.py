"""Every .tflite the pipeline emits loads and runs in LiteRT, with XNNPACK and on the builtin kernels alone.

Real MediaPipe models: selfie segmentation (the model cache) and the short-range face detector
from the same cached mediapipe wheel (written by an older converter that sets only the deprecated
operator codes; LiteRT Quantizer then quantized its conv weights as activations, which LiteRT
refused: ``conv.cc:390 zero_point != 0``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from server.compression import litert_tools
from server.compression.data import Dataset, validate_arrays
from server.compression.gate import GateSpec
from server.compression.pipeline import BuildOptions, ProfileResult, SourceModel, build_profile, inspect_source
from server.compression.runners import LiteRtRunner
from server.errors import ModelError
from server.profiles import get_profile
from tests.support.models import cache_dir, real_model

FACE_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
LANDMARK_MEMBER = "mediapipe/modules/face_landmark/face_landmark.tflite"
OPTIONS = BuildOptions(pruning=False, fallback=False, latency_runs=2)


def _face_detector(tmp_path: Path, member: str = FACE_MEMBER) -> Path:
    wheels = sorted((cache_dir() / "downloads").glob("mediapipe-*.whl"))
    assert wheels, f"no mediapipe wheel in {cache_dir() / 'downloads'}: run scripts/setup (fetch_models.py)"
    out = tmp_path / Path(member).name
    with zipfile.ZipFile(wheels[-1]) as wheel:
        out.write_bytes(wheel.read(member))
    return out


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _images(source: SourceModel, n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return validate_arrays({t.name: rng.uniform(-1.0, 1.0, (n, *t.shape[1:])).astype(np.float32)
                            for t in source.inputs}, source.inputs)


def _runs(path: Path, feed: dict[str, np.ndarray], *, xnnpack: bool) -> str | None:
    try:
        out = LiteRtRunner(path, xnnpack=xnnpack).run(feed)
    except ModelError as exc:
        return exc.message
    assert all(np.isfinite(o).all() for o in out if o.dtype.kind == "f")
    return None


def _check_all_emitted(result: ProfileResult, source: SourceModel, feed: dict[str, np.ndarray]) -> list[str]:
    builtin_source = _runs(source.path, feed, xnnpack=False)
    checked = []
    for cand in result.candidates:
        assert cand.status != "error", f"{cand.recipe.name}: {cand.reason}"
        assert cand.path is not None and cand.path.suffix == ".tflite"
        assert _runs(cand.path, feed, xnnpack=True) is None, cand.recipe.name
        if builtin_source is None:  # the source runs on the builtin kernels: so must every variant
            assert _runs(cand.path, feed, xnnpack=False) is None, cand.recipe.name
        checked.append(cand.recipe.name)
    return checked


def _conv_weights_symmetric(path: Path) -> int:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    convs = 0
    graph = model.subgraphs[0]
    for op in graph.operators:
        code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
        if code in (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D):
            weight, bias = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
            assert weight.type == schema.TensorType.INT8
            assert not np.any(np.asarray(weight.quantization.zeroPoint)), weight.name
            channels = weight.shape[3] if code == schema.BuiltinOperator.DEPTHWISE_CONV_2D else weight.shape[0]
            # per channel, or one scale where the gate affords it (litert_int8.per_tensor_search)
            assert len(weight.quantization.scale) in (1, channels), f"{weight.name!r}: scales per channel or one"
            assert bias.type == schema.TensorType.INT32
            convs += 1
    return convs


@pytest.mark.parametrize("profile", ["raspberry-pi-4", "coral-dev-board"])
def test_face_detector_variants_load_with_and_without_xnnpack(tmp_path: Path, profile: str) -> None:
    source = inspect_source(_face_detector(tmp_path))
    ev, cal = _images(source, 4, 1), _images(source, 8, 2)
    result = build_profile(source, get_profile(profile), GateSpec(metric="cosine", min_cosine=0.0),
                           evaluation=ev, calibration=cal, workdir=_mkdir(tmp_path / "work"), options=OPTIONS)
    names = _check_all_emitted(result, source, ev.feed(0))
    assert "litert-static-wi8-ai8" in names
    static = next(c for c in result.candidates if c.recipe.name == "litert-static-wi8-ai8")
    assert static.path is not None and _conv_weights_symmetric(static.path) > 30
    for cand in result.candidates:  # fp16 weights in the source: a quantized file is no bigger than the source
        assert cand.size_bytes <= source.size or cand.status == "failed"
    if profile == "coral-dev-board":
        assert static.passed and result.chosen.recipe.name == "litert-static-wi8-ai8"
    else:  # the source stores fp16 weights already: no second fp16 recipe, and it says why
        assert "fp16-weights" not in names
        assert any("already stores its weights as fp16" in n for n in result.provenance["notes"])


def test_selfie_variants_load_and_none_grows(tmp_path: Path) -> None:
    rm = real_model("selfie")
    source = inspect_source(rm.path)
    arrays = rm.load("evaluation", limit=4)
    ev = validate_arrays(arrays, source.inputs)
    cal = validate_arrays(rm.load("calibration", limit=8), source.inputs, role="calibration")
    result = build_profile(source, get_profile("raspberry-pi-5"), GateSpec(metric="iou", min_iou=0.0),
                           evaluation=ev, calibration=cal, workdir=tmp_path, options=OPTIONS)
    names = _check_all_emitted(result, source, ev.feed(0))
    assert {"fp32", "litert-dynamic-wi8", "litert-static-wi8-ai8"} <= set(names)
    for cand in result.candidates:
        if cand.recipe.kind != "fp32":
            assert cand.size_bytes < source.size, cand.recipe.name  # the fp16 source's weights are not doubled


def test_fp16_weights_halve_an_fp32_tflite_and_run_on_both_kernel_sets(tmp_path: Path) -> None:
    original = _face_detector(tmp_path)
    fp32 = tmp_path / "fp32.tflite"
    assert litert_tools.fold_fp16_weights(original, fp32) > 50  # an fp32-weight model, as converters write
    assert not litert_tools.stores_fp16_weights(fp32)
    source = inspect_source(fp32)
    ev, cal = _images(source, 4, 3), _images(source, 4, 4)
    result = build_profile(source, get_profile("x86-64-avx2"), GateSpec(metric="cosine", min_cosine=0.999),
                           evaluation=ev, calibration=cal, workdir=_mkdir(tmp_path / "work"),
                           options=BuildOptions(only=("fp16-weights",), pruning=False, fallback=False,
                                                latency_runs=2))
    half = next(c for c in result.candidates if c.recipe.name == "fp16-weights")
    assert half.passed and half.path is not None, half.reason
    assert half.size_bytes < 0.56 * source.size
    assert litert_tools.stores_fp16_weights(half.path)
    assert half.fidelity is not None and half.fidelity.min_cosine > 0.9999
    feed = ev.feed(0)
    for xnnpack in (True, False):
        ref = LiteRtRunner(original, xnnpack=xnnpack).run(feed)
        got = LiteRtRunner(half.path, xnnpack=xnnpack).run(feed)
        for a, b in zip(ref, got, strict=True):  # the weights were fp16 to begin with: the same values
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert result.chosen.recipe.name == "fp16-weights"


def test_face_landmark_full_int8_loads_on_both_kernel_sets(tmp_path: Path) -> None:
    """The landmark model failed the same way (``zero_point 2 != 0``); only the recipes that failed are run."""
    source = inspect_source(_face_detector(tmp_path, LANDMARK_MEMBER))
    ev, cal = _images(source, 2, 5), _images(source, 4, 6)
    result = build_profile(source, get_profile("coral-dev-board"), GateSpec(metric="cosine", min_cosine=0.0),
                           evaluation=ev, calibration=cal, workdir=_mkdir(tmp_path / "work"), options=OPTIONS)
    assert _check_all_emitted(result, source, ev.feed(0)) == ["litert-static-wi8-ai8"]
    static = result.candidates[0]
    assert static.path is not None and _conv_weights_symmetric(static.path) > 20
    assert static.size_bytes < 0.7 * source.size
