"""Static int8 that runs int8 on x86: U8S8 QDQ, fused by ONNX Runtime's CPU EP, and a fallback that keeps
the element-wise ops and the first convolutions in float (PP-OCRv4 det, the real model; structure is
asserted, not timings)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from server.compression import onnx_tools
from server.compression.data import load_dataset
from server.compression.gate import GateSpec
from server.compression.pipeline import BuildOptions, build_profile, inspect_source
from server.profiles import DeviceProfile, get_profile
from tests.support.models import real_model


def _vnni() -> DeviceProfile:
    """The VNNI x86 profile with no latency budget: a busy test machine must not fail the gate on time."""
    return replace(get_profile("x86-64-vnni"), latency_budget_ms=1e9)


def _ops_after_session_optimization(path: Path, tmp_path: Path) -> Counter[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what the agent runs
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_ppocr_det_int8_on_x86_is_fused_and_passes_with_elementwise_ops_and_4_convs_in_float(tmp_path: Path) -> None:
    rm = real_model("ppocr_det")
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration")
    result = build_profile(source, _vnni(), GateSpec(metric="iou"), evaluation=ev,
                           calibration=cal, workdir=tmp_path,
                           options=BuildOptions(only=("int8-static-minmax",), pruning=False, latency_runs=3))
    by_name = {c.recipe.name: c for c in result.candidates}
    static = by_name["int8-static-minmax"]
    assert static.recipe.params["types"] == "U8S8" and not static.recipe.params["reduce_range"]
    assert static.path is not None
    ops = _ops_after_session_optimization(static.path, tmp_path)
    # every convolution runs as QLinearConv: no float Conv between a DequantizeLinear and a QuantizeLinear
    assert ops["QLinearConv"] == 62 and ops["Conv"] == 0 and ops["QLinearAdd"] > 0, ops
    assert ops["DequantizeLinear"] < 60, ops  # S8S8 left 442 here
    # the whole-model int8 misses the IoU gate; the fallback keeps every element-wise node in float and the
    # first convolutions (graph order): one step, 4 of the 64 convolutions, passes
    assert not static.passed and static.fidelity is not None and static.fidelity.value < 0.97
    fallbacks = [c for c in result.candidates if "-fallback" in c.recipe.name]
    assert len(fallbacks) == 1 and fallbacks[0].passed, [(c.recipe.name, c.reason) for c in fallbacks]
    kept = set(fallbacks[0].recipe.params["float_nodes"])
    graph = onnx.load(str(source.path)).graph.node
    convs = [n.name for n in graph if n.op_type in ("Conv", "ConvTranspose")]
    assert {n for n in convs if n in kept} == set(convs[:4]) and convs[0] == "p2o.Conv.0", sorted(kept)
    elementwise = {n.name for n in onnx.load(str(static.path)).graph.node
                   if n.op_type in ("Add", "Mul", "HardSigmoid")}
    assert elementwise and elementwise <= kept
    # LCNetV3's scalar affine after 28 convolutions is folded into them before quantizing
    assert "28 scalar Mul/Add after a Conv folded into its weights and bias" in result.provenance["notes"]
    assert "24 hardswish (Add, Clip, Mul, Div) rewritten as x * HardSigmoid(x)" in result.provenance["notes"]
    assert fallbacks[0].path is not None
    fused = _ops_after_session_optimization(fallbacks[0].path, tmp_path)
    assert fused["QLinearConv"] == 62 - 4 and fused["Conv"] == 4 and fused["QLinearAdd"] == 0, fused
    assert result.chosen is fallbacks[0] and result.chosen.size_bytes < 0.4 * source.size


def test_the_fallback_is_skipped_when_int8_is_too_far_below_the_gate(tmp_path: Path) -> None:
    rm = real_model("ppocr_det")
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs).take(8)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration").take(8)
    result = build_profile(source, _vnni(), GateSpec(metric="iou", min_iou=0.999),
                           evaluation=ev, calibration=cal, workdir=tmp_path,
                           options=BuildOptions(only=("int8-static-minmax",), pruning=False, latency_runs=3))
    static = next(c for c in result.candidates if c.recipe.name == "int8-static-minmax")
    assert static.fidelity is not None and static.fidelity.value < 0.999 - 0.05
    assert not any("-fallback" in c.recipe.name for c in result.candidates)
    assert any(n.startswith("fallback skipped: the best int8 candidate (int8-static-minmax)")
               for n in result.provenance["notes"])


def test_a_passing_int8_candidate_is_compared_with_fp32_on_interleaved_timings(tmp_path: Path) -> None:
    """The selection's latency for an int8 candidate is fp32's scaled by a ratio timed in alternation
    (server/compression/retime.py), and the build says so; fp32-compute candidates are not re-timed."""
    rm = real_model("digits")
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs).take(16)
    cal = load_dataset(rm.calibration, source.inputs, role="calibration").take(16)
    result = build_profile(source, _vnni(), GateSpec(metric=rm.metric), evaluation=ev, calibration=cal,
                           workdir=tmp_path, options=BuildOptions(only=("int8-static-pertensor", "fp16-weights"),
                                                                  pruning=False, latency_runs=3))
    by_name = {c.recipe.name: c for c in result.candidates}
    int8, fp32 = by_name["int8-static-pertensor"], by_name["fp32"]
    assert int8.passed and fp32.latency_best_ms is not None and int8.latency_best_ms is not None
    notes = [n for n in result.provenance["notes"] if "timed in alternation with fp32" in n]
    assert len(notes) == 1 and notes[0].startswith("int8-static-pertensor:"), result.provenance["notes"]
    ratio = float(notes[0].split("rounds): ")[1].split("x")[0])
    assert abs(int8.latency_best_ms / fp32.latency_best_ms - ratio) < 0.01


def test_scalar_affine_after_a_conv_is_folded_exactly_and_shared_outputs_are_left(tmp_path: Path) -> None:
    """Conv -> Mul([1]) -> Add([1]) (LCNetV3's learnable affine) becomes one Conv with the same outputs;
    a Conv whose output has a second consumer keeps its Mul."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    w2 = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    h = onnx.helper
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                         (np.array([1.7], np.float32), "s"),
                                                         (np.array([-0.3], np.float32), "t"))]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Mul", ["s", "c1"], ["m1"], name="mul1"),
             h.make_node("Add", ["m1", "t"], ["a1"], name="add1"),
             h.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             h.make_node("Mul", ["c2", "s"], ["m2"], name="mul2"),
             h.make_node("Add", ["m2", "c2"], ["y"], name="add2")]  # c2 has two consumers: not folded
    graph = h.make_graph(nodes, "affine", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    path = tmp_path / "affine.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), str(path))
    x = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert onnx_tools.fold_conv_scalar_affine(path) == 1
    folded = onnx.load(str(path))
    assert [n.name for n in folded.graph.node] == ["conv1", "relu1", "conv2", "mul2", "add2"]
    assert {t.name for t in folded.graph.initializer} == {"c1_affine_w", "c1_affine_b", "w2", "s"}
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert onnx_tools.fold_conv_scalar_affine(path) == 0  # nothing left to fold


def test_exported_hardswish_is_rewritten_as_hardsigmoid_times_x(tmp_path: Path) -> None:
    h = onnx.helper
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((3.0, "three"), (0.0, "zero"),
                                                                               (6.0, "six"))]
    nodes = [h.make_node("Add", ["x", "three"], ["a"], name="add"),
             h.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
             h.make_node("Mul", ["x", "c"], ["m"], name="mul"),
             h.make_node("Div", ["m", "six"], ["y"], name="div"),
             h.make_node("Add", ["y", "six"], ["z"], name="not_hardswish")]  # + 6, no Clip after it
    graph = h.make_graph(nodes, "hswish", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                         [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 64])], inits)
    path = tmp_path / "hswish.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), str(path))
    x = {"x": np.linspace(-8, 8, 128, dtype=np.float32).reshape(2, 64)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert onnx_tools.fuse_hardswish(path) == 1
    rewritten = onnx.load(str(path)).graph
    assert [n.op_type for n in rewritten.node] == ["HardSigmoid", "Mul", "Add"]
    assert [t.name for t in rewritten.initializer] == ["six"]  # 3 and 0 no longer read
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
