"""The field's quantizers as edgefleet candidates: ORT's default (per-tensor) static and NNCF, and NNCF's
accuracy control driven by the gate's own metric and budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from server.compression import nncf_tools
from server.compression.data import Dataset, load_dataset
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.compression.recipes import plan
from server.compression.runners import open_runner, run_dataset
from server.profiles import load_profiles
from tests.support.models import real_model
from tests.support.servers.fleet import write_onnx


def test_peers_are_planned_where_static_int8_is() -> None:
    profiles = load_profiles()
    conv = frozenset({"Conv"})
    x86 = [r.name for r in plan(profiles["x86-64-vnni"], "onnx", ops=conv, has_calibration=True, nncf=True)]
    assert "int8-static-pertensor" in x86 and "int8-nncf" in x86
    pertensor = next(r for r in plan(profiles["x86-64-vnni"], "onnx", ops=conv, has_calibration=True)
                     if r.name == "int8-static-pertensor")
    assert pertensor.params["per_channel"] is False and pertensor.params["method"] == "minmax"
    assert "int8-nncf" not in [r.name for r in plan(profiles["x86-64-vnni"], "onnx", ops=conv, has_calibration=True)]
    no_calib = [r.name for r in plan(profiles["x86-64-vnni"], "onnx", ops=conv, has_calibration=False, nncf=True)]
    assert "int8-nncf" not in no_calib and "int8-static-pertensor" not in no_calib
    gpu = [r.name for r in plan(profiles["jetson-nano"], "onnx", ops=conv, has_calibration=True, nncf=True)]
    assert not any(n.startswith("int8") for n in gpu)  # Maxwell has no int8
    tflite = [r.name for r in plan(profiles["x86-64-vnni"], "tflite", ops=conv, has_calibration=True, nncf=True)]
    assert "int8-nncf" not in tflite


def test_accuracy_control_budget_is_the_gates() -> None:
    data = Dataset({"x": np.zeros((4, 64), np.float32)})
    ref = [np.zeros((4, 10), np.float32)]
    assert nncf_tools.validation_metric(GateSpec(metric="cosine", min_cosine=0.98), ref, data)[1:] == \
        pytest.approx((0.02, "absolute"))
    assert nncf_tools.validation_metric(GateSpec(metric="iou", min_iou=0.97), ref, data)[1:] == \
        pytest.approx((0.03, "absolute"))
    assert nncf_tools.validation_metric(GateSpec(metric="top1", min_top1=0.995), ref, data)[1:] == \
        pytest.approx((0.005, "absolute"))
    labelled = Dataset({"x": np.zeros((4, 64), np.float32)}, labels=np.zeros(4, np.int64))
    assert nncf_tools.validation_metric(GateSpec(metric="accuracy", max_relative_drop=0.02), ref, labelled)[1:] == \
        pytest.approx((0.02, "relative"))
    # no labels where accuracy control validates: agreement with fp32's top-1 stands in, with the top1 budget
    assert nncf_tools.validation_metric(GateSpec(metric="accuracy"), ref, data)[1:] == pytest.approx((0.01, "absolute"))


def test_validation_fn_scores_a_model_against_the_reference(tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "m.onnx", seed=3)
    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.standard_normal((6, 1, 64)).astype(np.float32)}, layout="sample")
    reference = run_dataset(open_runner(path, "onnx"), data)
    fn, _, _ = nncf_tools.validation_metric(GateSpec(metric="top1"), reference, data)
    value, per_item = fn(onnx.load(str(path)), range(6))
    assert value == 1.0 and per_item == [1.0] * 6
    wrong = [-r for r in reference]  # another model's answers: the arg-max moves on most samples
    fn, _, _ = nncf_tools.validation_metric(GateSpec(metric="top1"), wrong, data)
    value, per_item = fn(onnx.load(str(path)), [0, 2, 4])
    assert value < 1.0 and len(per_item) == 3 and value == pytest.approx(np.mean(per_item))


def test_nncf_quantize_stores_int8_weights_and_keeps_digits_accuracy(tmp_path: Path) -> None:
    rm = real_model("digits")
    source = open_runner(rm.path, "onnx")
    cal = load_dataset(rm.calibration, source.inputs, role="calibration")
    ev = load_dataset(rm.evaluation, source.inputs)
    out = tmp_path / "nncf.onnx"
    nncf_tools.quantize(rm.path, out, cal)
    assert out.stat().st_size < 0.35 * rm.path.stat().st_size  # int8 weights, not fp32 ones with a Q node
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    gate = GateSpec(metric="accuracy")
    fid = measure_fidelity(run_dataset(source, ev), run_dataset(open_runner(out, "onnx"), ev), gate, ev.labels)
    assert check_fidelity(fid, gate) is None, fid
