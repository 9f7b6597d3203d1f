"""The float-storage recipe on ONNX: fp16 initializers + Cast, fp32 compute, half the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.compression import onnx_tools
from server.compression.data import load_dataset
from server.compression.gate import GateSpec
from server.compression.pipeline import BuildOptions, build_profile, inspect_source
from server.compression.recipes import plan
from server.compression.runners import OrtRunner
from server.profiles import get_profile, load_profiles
from tests.support.models import real_model


def _tiny(path: Path) -> None:
    rng = np.random.default_rng(0)
    big = np.ones(300, dtype=np.float32)
    big[7] = 1e6  # beyond fp16: must stay fp32
    w = rng.standard_normal((300, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),  # Paddle-style weight
        helper.make_node("Mul", ["x", "big"], ["xs"]),
        helper.make_node("MatMul", ["xs", "W"], ["y0"]),
        helper.make_node("Add", ["y0", "b"], ["y1"]),
        helper.make_node("Reshape", ["y1", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 2])],
        initializer=[numpy_helper.from_array(big, "big"), numpy_helper.from_array(np.ones(4, np.float32), "b"),
                     numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_fp16_weights_keep_ints_tiny_and_out_of_range_tensors(tmp_path: Path) -> None:
    src, dst = tmp_path / "tiny.onnx", tmp_path / "half.onnx"
    _tiny(src)
    assert onnx_tools.fp16_weights(src, dst) == 1  # only W: big is out of range, b tiny, shape int
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types == {"big": TensorProto.FLOAT, "b": TensorProto.FLOAT, "shape": TensorProto.INT64,
                     "W__fp16": TensorProto.FLOAT16}
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    x = np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32) * 1e-6
    ref, got = OrtRunner(src).run({"x": x})[0], OrtRunner(dst).run({"x": x})[0]
    assert got.dtype == np.float32 and got.shape == (3, 2, 2)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-3)


def test_every_float_profile_gets_the_recipe_but_coral() -> None:
    for pid, profile in load_profiles().items():
        for fmt in ("onnx", "tflite"):
            names = [r.name for r in plan(profile, fmt, ops=frozenset({"Conv"}), has_calibration=True)]
            assert ("fp16-weights" in names) == (pid != "coral-dev-board"), (pid, fmt)


def test_ppocr_det_ships_half_the_file_at_iou_one(tmp_path: Path) -> None:
    rm = real_model("ppocr_det")
    source = inspect_source(rm.path)
    ev = load_dataset(rm.evaluation, source.inputs).take(12)
    result = build_profile(source, get_profile("raspberry-pi-4"), GateSpec(metric="iou"), evaluation=ev,
                           calibration=None, workdir=tmp_path,
                           options=BuildOptions(only=("fp16-weights",), pruning=False, fallback=False,
                                                latency_runs=3))
    half = next(c for c in result.candidates if c.recipe.name == "fp16-weights")
    assert half.passed, half.reason
    assert half.size_bytes < 0.52 * source.size
    assert half.fidelity is not None and half.fidelity.value > 0.999
    assert result.chosen.recipe.name == "fp16-weights"
