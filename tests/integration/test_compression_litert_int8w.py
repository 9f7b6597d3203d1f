"""LiteRT int8 weight storage (``int8-weights``, ``int8-weights-searched``) on real MediaPipe models.

The face detector from the cached mediapipe wheel stores fp16 weights, as MediaPipe ships them: int8
is what halves it. Every file must load and run with XNNPACK and on the builtin kernels alone, keep
the source's float I/O, and give each conv with int8 weights a fp32 bias (with a fp16 bias XNNPACK
left those convs to the builtin kernels: 2.9x fp32's latency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.compression import litert_graph, litert_int8w, litert_tools
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.compression.pipeline import BuildOptions, build_profile, inspect_source
from server.compression.runners import LiteRtRunner, run_dataset
from server.profiles import get_profile
from tests.integration.test_compression_litert import _face_detector, _images, _mkdir


def _read(path: Path) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))


def _int8_convs(path: Path) -> int:
    """Convs whose weights are int8 behind a DEQUANTIZE; asserts symmetric scales and fp32 constant biases."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = _read(path)
    graph = model.subgraphs[0]
    producer = {int(t): op for op in graph.operators for t in op.outputs}

    def code(op: Any) -> int:
        return int(flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]))

    convs = 0
    for op in graph.operators:
        if code(op) not in (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D):
            continue
        dq = producer.get(int(op.inputs[1]))
        if dq is None or code(dq) != schema.BuiltinOperator.DEQUANTIZE:
            continue
        stored = graph.tensors[dq.inputs[0]]
        if stored.type != schema.TensorType.INT8:
            assert stored.type == schema.TensorType.FLOAT16  # kept: a fp16 depthwise filter
            continue
        assert not np.any(np.asarray(stored.quantization.zeroPoint)), stored.name
        assert len(stored.quantization.scale) in (1, stored.shape[stored.quantization.quantizedDimension])
        bias = graph.tensors[op.inputs[2]]
        assert int(op.inputs[2]) not in producer and bias.type == schema.TensorType.FLOAT32, bias.name
        convs += 1
    return convs


def _both_kernel_sets(source: Path, variant: Path, feed: dict[str, np.ndarray], min_cosine: float) -> None:
    for xnnpack in (True, False):
        ref = LiteRtRunner(source, xnnpack=xnnpack).run(feed)
        got = LiteRtRunner(variant, xnnpack=xnnpack).run(feed)
        for a, b in zip(ref, got, strict=True):
            assert b.dtype == a.dtype == np.float32
            cos = float(a.ravel() @ b.ravel()) / float(np.linalg.norm(a) * np.linalg.norm(b))
            assert cos > min_cosine, (xnnpack, cos)


def test_fp16_face_detector_weights_become_int8(tmp_path: Path) -> None:
    source = _face_detector(tmp_path)
    out = tmp_path / "int8w.tflite"
    plans = litert_int8w.int8_weights(source, out)
    kinds = {p.granularity for p in plans}
    assert kinds == {"per-channel", "kept"}  # 3x3 depthwise filters: per-channel scales cost more than fp16
    assert _int8_convs(out) == sum(p.granularity == "per-channel" for p in plans) == 21
    assert out.stat().st_size < 0.70 * source.stat().st_size
    spec = inspect_source(source)
    _both_kernel_sets(source, out, _images(spec, 1, 7).feed(0), 0.995)
    assert litert_tools.io_specs(out) == litert_tools.io_specs(source)

    smaller = tmp_path / "per-tensor.tflite"
    plans = litert_int8w.int8_weights(source, smaller, max_tensor_error=1.0)
    assert {p.granularity for p in plans} == {"per-tensor"}
    assert _int8_convs(smaller) == 37 and smaller.stat().st_size < out.stat().st_size
    _both_kernel_sets(source, smaller, _images(spec, 1, 7).feed(0), 0.9)  # coarser, still the same model


def test_fp32_weights_get_a_dequantize_and_a_third_of_the_size(tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.tflite"
    assert litert_tools.fold_fp16_weights(_face_detector(tmp_path), fp32) > 50
    out = tmp_path / "int8w.tflite"
    plans = litert_int8w.int8_weights(fp32, out)
    assert {p.granularity for p in plans} == {"per-channel", "kept"}
    assert _int8_convs(out) == 21
    assert out.stat().st_size < 0.45 * fp32.stat().st_size
    _both_kernel_sets(fp32, out, _images(inspect_source(fp32), 1, 8).feed(0), 0.995)


def test_search_spends_the_budget_on_the_calibration_split_only(tmp_path: Path) -> None:
    source = _face_detector(tmp_path)
    spec = inspect_source(source)
    cal = _images(spec, 6, 9)
    gate = GateSpec(metric="cosine", min_cosine=0.995)
    per_channel, searched = tmp_path / "pc.tflite", tmp_path / "searched.tflite"
    litert_int8w.int8_weights(source, per_channel)
    plans = litert_int8w.search(source, searched, cal, gate)
    assert "per-tensor" in {p.granularity for p in plans}
    assert searched.stat().st_size < per_channel.stat().st_size
    assert not (tmp_path / "searched.trial.tflite").exists()
    fid = measure_fidelity(run_dataset(LiteRtRunner(source), cal), run_dataset(LiteRtRunner(searched), cal),
                           litert_int8w._tighter(gate), None)
    assert check_fidelity(fid, litert_int8w._tighter(gate)) is None, fid.value



def test_the_pipeline_offers_and_ships_int8_weights(tmp_path: Path) -> None:
    source = inspect_source(_face_detector(tmp_path))
    ev, cal = _images(source, 4, 10), _images(source, 6, 11)
    # a profile this machine does not stand in for: no latency measured, the choice is by size and fidelity
    result = build_profile(source, get_profile("raspberry-pi-5"), GateSpec(metric="cosine", min_cosine=0.99),
                           evaluation=ev, calibration=cal, workdir=_mkdir(tmp_path / "work"),
                           options=BuildOptions(only=("fp32", "int8-weights", "int8-weights-searched"),
                                                pruning=False, fallback=False, latency_runs=2))
    by_name = {c.recipe.name: c for c in result.candidates}
    assert set(by_name) == {"fp32", "int8-weights", "int8-weights-searched"}
    for name in ("int8-weights", "int8-weights-searched"):
        cand = by_name[name]
        assert cand.passed, (name, cand.reason)
        assert cand.path is not None and cand.size_bytes < 0.70 * source.size
        for xnnpack in (True, False):
            LiteRtRunner(cand.path, xnnpack=xnnpack).run(ev.feed(0))
    assert result.chosen.recipe.kind == "int8w"
    assert result.provenance["recipe"]["params"]["storage"] == "int8"


def test_choose_keeps_small_depthwise_filters_fp16_and_takes_per_tensor_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    depthwise = rng.normal(size=(1, 3, 3, 64)).astype(np.float32) * rng.uniform(0.01, 1, 64).astype(np.float32)
    assert litert_int8w.choose(depthwise, 3, 0.0)[0] == "kept"  # 9 weights a channel < 12 bytes of scale
    conv = rng.normal(size=(32, 1, 1, 64)).astype(np.float32)
    granularity, q, scale, err = litert_int8w.choose(conv, 0, 0.0)
    assert granularity == "per-channel" and q.dtype == np.int8 and scale.shape == (32,) and err < 0.01
    assert litert_int8w.choose(conv, 0, 0.05)[0] == "per-tensor"
    assert int(np.abs(q).max()) == 127 and int(q.min()) >= -127  # symmetric: zero point 0, -128 unused


def test_full_int8_gets_the_source_float_io_on_cpu_profiles(tmp_path: Path) -> None:
    """LiteRT Quantizer's static recipe quantizes the graph's inputs and outputs; wrapped, the variant takes
    and returns float32 like the source and computes the same values on both kernel sets."""
    source_path = _face_detector(tmp_path)
    source = inspect_source(source_path)
    ev, cal = _images(source, 2, 12), _images(source, 6, 13)
    int8_io, wrapped = tmp_path / "int8io.tflite", tmp_path / "float_io.tflite"
    litert_tools.quantize(source_path, int8_io, "static_wi8_ai8", cal)
    assert {t.dtype for t in litert_tools.io_specs(int8_io)[0]} == {"int8"}
    assert litert_tools.float_io(int8_io, wrapped) == 3
    assert [(t.name, t.dtype, t.shape) for t in (*litert_tools.io_specs(wrapped)[0],
                                                   *litert_tools.io_specs(wrapped)[1])] == \
        [(t.name, t.dtype, t.shape) for t in (*source.inputs, *source.outputs)]
    feed = ev.feed(0)
    for xnnpack in (True, False):
        a = LiteRtRunner(int8_io, xnnpack=xnnpack).run(feed)  # the runner (de)quantizes int8 I/O itself
        b = LiteRtRunner(wrapped, xnnpack=xnnpack).run(feed)
        for x, y in zip(a, b, strict=True):
            assert y.dtype == np.float32
            np.testing.assert_allclose(x, y, atol=0.1 * float(np.abs(x).max()))

    result = build_profile(source, get_profile("x86-64-vnni"), GateSpec(metric="cosine", min_cosine=0.0),
                           evaluation=ev, calibration=cal, workdir=_mkdir(tmp_path / "work"),
                           options=BuildOptions(only=("litert-static-wi8-ai8",), pruning=False, fallback=False,
                                                latency_runs=2))
    static = next(c for c in result.candidates if c.recipe.name == "litert-static-wi8-ai8")
    assert static.recipe.params["float_io"] and static.passed, static.reason  # no "changes the I/O types"
    assert static.path is not None and litert_graph.delegation(static.path).complete  # RELUs fused: all XNNPACK


def test_bias_correction_takes_the_rounding_shift_off_the_biases(tmp_path: Path) -> None:
    source = _face_detector(tmp_path)
    spec = inspect_source(source)
    cal, ev = _images(spec, 6, 14), _images(spec, 4, 15)
    plain, corrected = tmp_path / "plain.tflite", tmp_path / "corrected.tflite"
    litert_int8w.int8_weights(source, plain, max_tensor_error=1.0)
    means = litert_int8w.activation_means(source, cal)
    assert "input" in means and means["input"].shape == (3,)
    litert_int8w.int8_weights(source, corrected, max_tensor_error=1.0, means=means)
    # the same tensors, other bias values (within 2 %: identical bias vectors of the plain file are stored once)
    assert plain.stat().st_size <= corrected.stat().st_size < 1.02 * plain.stat().st_size
    reference = run_dataset(LiteRtRunner(source), ev)
    gate = GateSpec(metric="cosine")

    def mean_cosine(path: Path) -> float:
        fid = measure_fidelity(reference, run_dataset(LiteRtRunner(path), ev), gate, None)
        assert fid.mean_cosine is not None
        return fid.mean_cosine

    assert mean_cosine(corrected) > mean_cosine(plain)
