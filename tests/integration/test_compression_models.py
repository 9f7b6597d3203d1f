"""The compression pipeline on the other real models: PP-OCRv4 detection (CNN, static QDQ), MiniLM
(transformer, dynamic int8) and MediaPipe selfie segmentation (.tflite through LiteRT Quantizer).

Kept small for CI: one calibration method, few evaluation samples, one MiniLM test.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from server.compression import onnx_tools
from server.compression.data import load_dataset
from server.compression.gate import GateSpec, measure_fidelity
from server.compression.pipeline import BuildOptions, ProfileResult, build_profile, inspect_source
from server.compression.runners import open_runner, run_dataset
from server.errors import GateError
from server.profiles import get_profile
from tests.support.models import real_model


def _build(name: str, profile: str, tmp_path: Path, gate: GateSpec, options: BuildOptions) -> ProfileResult:
    rm = real_model(name)
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration")
    return build_profile(source, get_profile(profile), gate, evaluation=ev, calibration=cal, workdir=tmp_path,
                         options=options)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_ppocr_static_qdq_is_built_and_gated_on_the_probability_map(tmp_path: Path) -> None:
    result = _build("ppocr_det", "raspberry-pi-5", tmp_path, GateSpec(metric="iou"),
                    BuildOptions(methods=("minmax",), pruning=False, fallback=False, evaluation_limit=16,
                                 latency_runs=3))
    by_name = {c.recipe.name: c for c in result.candidates}
    static = by_name["int8-static-minmax"]
    assert static.path is not None and static.fidelity is not None, static.reason
    ops = _ops(static.path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert static.opset is not None and static.opset <= 22  # raspberry-pi-5's ORT max_opset
    assert static.recipe.params["types"] == "S8S8" and static.size_bytes < 0.5 * by_name["fp32"].size_bytes
    assert 0.0 <= static.fidelity.value <= 1.0 and static.fidelity.mean_iou == static.fidelity.value
    # what ships passed the gate, or is fp32 because nothing else did
    chosen = result.chosen
    if result.fell_back:
        assert chosen.recipe.name == "fp32"
        assert all(not c.passed for c in result.candidates if c.recipe.name != "fp32")
    else:
        assert chosen.passed and chosen.fidelity is not None and chosen.fidelity.value >= 0.97
    assert result.provenance["datasets"]["calibration_samples"] == 24


def test_minilm_int8_keeps_cosine_and_shrinks_4x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This test is about sizes and fidelity. Timed on a busy machine, int8 can look slower than fp32 and be set
    # aside (the selection's own tests cover that with injected timings), so this build times nothing.
    monkeypatch.setattr("server.compression.pipeline.stand_in", lambda _profile: (False, "not timed in this test"))
    result = _build("minilm", "x86-64-avx2", tmp_path, GateSpec(metric="cosine", min_cosine=0.99),
                    BuildOptions(only=("int8-dynamic", "int8-weight-only"), pruning=False, fallback=False,
                                 evaluation_limit=100, latency_runs=5))
    # torch-exported MiniLM defeats symbolic shape inference: the pre-processing fallback is recorded
    assert any("skip_symbolic_shape" in n for n in result.provenance["notes"]), result.provenance["notes"]
    by_name = {c.recipe.name: c for c in result.candidates}
    fp32, dyn, wo = by_name["fp32"], by_name["int8-dynamic"], by_name["int8-weight-only"]
    assert dyn.recipe.params["reduce_range"] is True  # x86 without VNNI
    assert dyn.fidelity is not None and dyn.size_bytes < 0.3 * fp32.size_bytes  # embeddings quantized too
    assert wo.passed, wo.reason
    assert wo.fidelity is not None and wo.fidelity.min_cosine >= 0.99
    assert wo.size_bytes < 0.27 * fp32.size_bytes
    assert wo.path is not None and "MatMulNBits" in _ops(wo.path)
    chosen = result.chosen
    assert chosen.passed and chosen.recipe.precision == "int8" and chosen.size_bytes < 0.3 * fp32.size_bytes
    if chosen.recipe.name == "int8-weight-only":
        assert result.runtime.min_version == "1.22"  # MatMulNBits' 8-bit x86 kernel
    assert result.provenance["compressed_size_estimated"] is True  # 23 MB: sizes from a sample

    # the fallback's ranking for dynamic int8 (ARM profiles, which get no weight-only recipe): keeping the
    # six most sensitive MatMuls in float lifts the failing dynamic variant over the gate
    rm = real_model("minilm")
    ev = load_dataset(rm.evaluation, inspect_source(rm.path).inputs).take(100)
    pre = next(tmp_path.glob("*/pre.onnx"))  # the quantizers' input, in the build share's folder
    ranked = onnx_tools.matmul_sensitivity(pre, ev, weight_bits=7)
    assert len(ranked) == 36 and all(n.endswith("MatMul") for n in ranked)
    fallback = tmp_path / "fallback.onnx"
    onnx_tools.quantize_dynamic(pre, fallback, per_channel=True, reduce_range=True,
                                op_types=["MatMul", "Gemm", "Gather"], exclude=ranked[:6])
    reference = run_dataset(open_runner(rm.path, "onnx"), ev)
    fid = measure_fidelity(reference, run_dataset(open_runner(fallback, "onnx"), ev), GateSpec(), None)
    assert fid.min_cosine > dyn.fidelity.min_cosine and fid.min_cosine >= 0.99
    assert fallback.stat().st_size < 0.4 * fp32.size_bytes


def test_selfie_tflite_goes_through_litert_quantizer(tmp_path: Path) -> None:
    rm = real_model("selfie")
    (tmp_path / "pi5").mkdir()
    result = _build("selfie", "raspberry-pi-5", tmp_path / "pi5", GateSpec(metric="iou"),
                    BuildOptions(latency_runs=3))
    names = {c.recipe.name: c for c in result.candidates}
    assert {"fp32", "litert-dynamic-wi8", "litert-static-wi8-ai8"} <= set(names)
    assert result.runtime.runtime == "litert" and result.runtime.format == "tflite"
    assert result.chosen.path is not None and result.chosen.path.suffix == ".tflite"
    for c in result.candidates:  # fp16 weights are folded so the quantizer has weights to work on
        if c.recipe.name != "fp32":
            assert c.size_bytes != rm.path.stat().st_size  # the quantizer did change the model
        if c.status == "skipped":  # larger than a passing candidate: not evaluated (gate.cannot_win)
            assert "cannot be chosen" in c.reason and c.fidelity is None
            continue
        assert c.status in ("passed", "failed"), c.reason
        assert c.fidelity is not None and c.fidelity.metric == "iou"
    # on real people int8 weight storage keeps the mask (IoU >= 0.97): selfie no longer ships fp32
    assert result.chosen.recipe.name != "fp32"
    assert result.chosen.passed and result.chosen.size_bytes < 0.7 * rm.path.stat().st_size
    # the Edge TPU runs full int8 only: it gets that variant, or a clear refusal when it fails the gate
    (tmp_path / "coral").mkdir()
    try:
        coral = _build("selfie", "coral-dev-board", tmp_path / "coral", GateSpec(metric="iou"),
                       BuildOptions(latency_runs=3))
    except GateError as exc:
        assert "cannot run fp32" in exc.message and "litert-static-wi8-ai8" in exc.message
    else:
        assert coral.chosen.recipe.name == "litert-static-wi8-ai8" and coral.chosen.passed
