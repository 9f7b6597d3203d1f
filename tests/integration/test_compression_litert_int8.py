"""LiteRT full int8 that XNNPACK runs end to end (``server/compression/litert_int8.py``), on real models.

MediaPipe's face detector (17 standalone RELUs: before fusion XNNPACK left every int8 RELU to the
builtin kernels, 18 partitions) and face landmark model (23 PRELUs, which XNNPACK runs in float only:
they stay float between a DEQUANTIZE and a QUANTIZE, inside the one partition). Every file must load and
run with XNNPACK and on the builtin kernels alone, with the source's float I/O.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.protocol.messages import RuntimeSpec
from agent.runtime.inference import InferenceOptions, open_session
from server.compression import litert_graph, litert_int8, litert_tools
from server.compression.data import Dataset, validate_arrays
from server.compression.gate import GateSpec, measure_fidelity
from server.compression.runners import LiteRtRunner, run_dataset
from server.errors import ModelError
from tests.integration.test_compression_litert import _face_detector, _runs
from tests.support.models import RealModel, real_model


def _split(name: str, split: str, limit: int) -> Dataset:
    rm = real_model(name)
    return validate_arrays(rm.load(split, limit=limit), rm.inputs, role=split)


def _loads_both_ways(path: Path, feed: dict[str, np.ndarray]) -> None:
    assert _runs(path, feed, xnnpack=True) is None
    assert _runs(path, feed, xnnpack=False) is None


def _agent_serves(path: Path, rm: RealModel, feed: dict[str, np.ndarray]) -> None:
    """The agent's LiteRT backend (its defaults: XNNPACK, as chosen) serves ``path`` with the source's float
    I/O and the outputs LiteRT gives here."""
    session = open_session(path, RuntimeSpec(format="tflite", runtime="litert"), InferenceOptions(intra_op_threads=1))
    try:
        assert [(t.name, t.dtype) for t in session.inputs] == [(t.name, t.dtype) for t in rm.inputs]
        served = session.run(feed)
    finally:
        session.close()
    for spec, value in zip(rm.outputs, LiteRtRunner(path).run(feed), strict=True):
        np.testing.assert_allclose(served[spec.name], value, rtol=1e-5, atol=1e-5)


def test_fused_relus_compute_the_same_and_xnnpack_takes_every_int8_op(tmp_path: Path) -> None:
    source = _face_detector(tmp_path)
    fused = tmp_path / "fused.tflite"
    assert litert_graph.fuse_activations(source, fused) == 17
    assert litert_graph.fuse_activations(fused, tmp_path / "again.tflite") == 0  # nothing left to fuse
    feed = _split("face_det", "evaluation", 1).feed(0)
    for xnnpack in (True, False):
        for a, b in zip(LiteRtRunner(source, xnnpack=xnnpack).run(feed), LiteRtRunner(fused, xnnpack=xnnpack).run(feed),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    cal = _split("face_det", "calibration", 8)
    plain = tmp_path / "plain.tflite"  # what the static recipe made before: the RELUs left to the builtin kernels
    litert_tools.quantize(source, plain, "static_wi8_ai8", cal)
    before = litert_graph.delegation(plain)
    assert before.builtin == {"RELU": 17} and before.partitions == 18, before.describe()
    out = tmp_path / "int8.tflite"
    made = litert_int8.static_int8(source, out, cal, powers=())
    assert made.fused == 17 and made.float_ops == () and made.fidelity is None and made.equalized == 0
    assert made.delegation.complete and made.delegation.partitions == 1, made.delegation.describe()
    assert "RELU" not in made.delegation.delegated and made.delegation.delegated["CONV_2D"] == 21
    assert [(t.dtype, t.shape) for t in litert_tools.io_specs(out)[0]] == [("float32", (1, 128, 128, 3))]
    _loads_both_ways(out, feed)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # the intermediates are gone
        ["again.tflite", "face_detection_short_range.tflite", "fused.tflite", "int8.tflite", "plain.tflite",
         "plain.fp32.tflite", "plain.signed.tflite"])


def test_minmax_ranges_serve_the_worst_sample_better_than_the_moving_average(tmp_path: Path) -> None:
    """The quantizer's calibrator averages each sample's min/max (weight 0.95 on the past): unusual images
    get clipped activations, and the gate judges the worst one."""
    source = real_model("face_det").path
    cal, ev = _split("face_det", "calibration", 48), _split("face_det", "evaluation", 96)
    reference = run_dataset(LiteRtRunner(source), ev)
    worst = {}
    for ranges in ("ema", "minmax"):
        out = tmp_path / f"{ranges}.tflite"
        litert_int8.static_int8(source, out, cal, ranges=ranges, powers=())
        fid = measure_fidelity(reference, run_dataset(LiteRtRunner(out), ev), GateSpec(metric="cosine"), None)
        worst[ranges] = fid.min_cosine
    assert worst["minmax"] > worst["ema"] + 0.03, worst  # measured: 0.909 -> 0.976


def test_float_tail_keeps_the_last_ops_float_with_fp16_weights(tmp_path: Path) -> None:
    source = real_model("face_det").path
    cal = _split("face_det", "calibration", 8)
    out = tmp_path / "tail.tflite"
    never = GateSpec(metric="cosine", min_cosine=1.0)  # nothing passes: the most faithful tail is kept
    made = litert_int8.static_int8(source, out, cal, gate=never, powers=(), fractions=(0.0, 0.1))
    assert {"regressors;", "classificators;"} <= set(made.float_ops)  # the outputs' concatenations
    assert made.fidelity is not None and 0.9 < made.fidelity < 1.0
    assert made.delegation.complete, made.delegation.describe()
    assert litert_tools.stores_fp16_weights(out)  # the float heads' weights
    _loads_both_ways(out, cal.feed(0))
    scopes = litert_int8._scopes(source)
    assert litert_int8.tail(scopes, 0.0) == ()
    assert litert_int8.tail(scopes, 1.0)[0] == scopes[0][1] or scopes[0][0] in {"QUANTIZE", "DEQUANTIZE"}


def test_face_landmarks_pass_the_gate_in_int8_inside_one_partition(tmp_path: Path) -> None:
    rm = real_model("face_mesh")
    cal, ev = _split("face_mesh", "calibration", 16), _split("face_mesh", "evaluation", 16)
    out = tmp_path / "mesh.tflite"
    made = litert_int8.static_int8(rm.path, out, cal, gate=GateSpec(metric="cosine"))
    assert made.float_ops == () and made.fidelity is not None and made.fidelity > 0.999
    assert made.delegation.complete and made.delegation.partitions == 1
    assert made.delegation.delegated["PRELU"] == 23  # float PRELU between DEQUANTIZE and QUANTIZE
    assert out.stat().st_size < 0.65 * rm.path.stat().st_size
    reference = run_dataset(LiteRtRunner(rm.path), ev)
    fid = measure_fidelity(reference, run_dataset(LiteRtRunner(out), ev), GateSpec(metric="cosine"), None)
    assert fid.min_cosine > 0.999
    _loads_both_ways(out, ev.feed(0))
    _agent_serves(out, rm, ev.feed(0))



def test_equalization_keeps_the_function_and_lets_face_det_pass_its_gate_in_int8(tmp_path: Path) -> None:
    """Cross-layer equalization: the float model computes the same; full int8 then passes face_det's own
    gate (min cosine 0.99 over its 96 evaluation images: 0.976 without it), every op in XNNPACK."""
    rm = real_model("face_det")
    cal, ev = _split("face_det", "calibration", 48), _split("face_det", "evaluation", 96)
    folded, equalized = tmp_path / "fp32.tflite", tmp_path / "equalized.tflite"
    litert_tools.fold_fp16_weights(rm.path, folded)
    assert litert_int8.equalize(folded, equalized, cal, 0.75) == 16  # every depthwise -> conv pair
    reference = run_dataset(LiteRtRunner(rm.path), ev)
    same = measure_fidelity(reference, run_dataset(LiteRtRunner(equalized), ev), GateSpec(metric="cosine"), None)
    assert same.min_cosine > 0.99999
    out = tmp_path / "int8.tflite"
    gate = GateSpec(metric=rm.metric)
    made = litert_int8.static_int8(rm.path, out, cal, gate=gate)
    assert made.equalized == 16 and made.power is not None and made.delegation.complete
    fid = measure_fidelity(reference, run_dataset(LiteRtRunner(out), ev), gate, None)
    assert fid.min_cosine >= gate.min_cosine, (made, fid.min_cosine)
    assert out.stat().st_size < 0.85 * rm.path.stat().st_size
    _loads_both_ways(out, ev.feed(0))


def test_range_rules_nest_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    folded, signed = tmp_path / "fp32.tflite", tmp_path / "signed.tflite"
    litert_tools.fold_fp16_weights(real_model("face_det").path, folded)
    assert litert_tools.with_default_signature(folded, signed)  # MediaPipe's model has no signature
    cal = _split("face_det", "calibration", 8)
    full, q75 = litert_int8.calibrate(signed, cal, "minmax"), litert_int8.calibrate(signed, cal, "q75")
    assert full.keys() == q75.keys()
    ranged = [name for name, qsv in full.items() if qsv]
    assert len(ranged) > 50
    for name in ranged:  # a quantile of the per-sample extremes lies within the extremes over all samples
        assert np.all(q75[name]["max"] <= full[name]["max"]) and np.all(q75[name]["min"] >= full[name]["min"])
    assert any(np.any(q75[n]["max"] < full[n]["max"]) for n in ranged)
    with pytest.raises(ModelError, match="unknown range rule"):
        litert_int8.calibrate(signed, cal, "p50")
