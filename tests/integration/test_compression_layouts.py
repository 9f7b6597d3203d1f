"""Models whose inputs are not batch-first register and build: a state ``[2, batch, H]`` and a scalar int64.

A tiny ONNX model of that shape (made here with onnx.helper) and the real Silero VAD from the model
cache (``vad``, fetched by scripts/fetch_models.py), through ``Catalog.add_model`` + ``build``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.build_ops import build_variant, synthetic_dataset
from server.compression.pipeline import BuildOptions, inspect_source
from server.profiles import get_profile
from server.registry.catalog import Catalog
from tests.support.models import cache_dir

H = 16


def _stateful(path: Path) -> None:
    """output [batch, 1] = sigmoid(mean(input) + 0*sr); stateN [2, batch, H] = tanh(state @ W)."""
    w = np.random.default_rng(0).standard_normal((H, H)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["srf", "zero"], ["z"]),
        helper.make_node("Add", ["m", "z"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("MatMul", ["state", "W"], ["s"]),
        helper.make_node("Tanh", ["s"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", H]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", H])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _per_sample(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, input=rng.standard_normal((n, 1, 64)).astype(np.float32),
             state=rng.standard_normal((n, 2, 1, H)).astype(np.float32),
             sr=np.full((n,), 16000, dtype=np.int64))
    return path


def test_synthetic_inputs_follow_every_fixed_dimension_and_dtype(tmp_path: Path) -> None:
    _stateful(tmp_path / "m.onnx")
    ds = synthetic_dataset(inspect_source(tmp_path / "m.onnx"), samples=3)
    feed = ds.feed(0)
    assert feed["input"].shape == (1, 1) and feed["state"].shape == (2, 1, H)
    assert feed["sr"].shape == () and feed["sr"].dtype == np.int64


def test_a_stateful_model_builds_without_data_and_with_per_sample_data(tmp_path: Path) -> None:
    _stateful(tmp_path / "m.onnx")
    catalog = Catalog.open(tmp_path / "home")
    bare = catalog.add_model(tmp_path / "m.onnx", "bare")
    build, result = build_variant(catalog, bare, get_profile("x86-64-avx2"))
    assert build.variant == "fp32" and result.chosen.passed  # checked on synthetic per-sample feeds
    assert result.chosen.fidelity is not None and result.chosen.fidelity.value > 0.999
    assert result.health.golden and result.health.golden[0].inputs["state"].shape == (2, 1, H)

    mv = catalog.add_model(tmp_path / "m.onnx", "vadlike", calibration=_per_sample(tmp_path / "cal.npz", 16, 1),
                           evaluation=_per_sample(tmp_path / "ev.npz", 12, 2))
    build, result = build_variant(catalog, mv, get_profile("raspberry-pi-5"),
                                  options=BuildOptions(methods=("minmax",), fallback=False, latency_runs=3))
    names = {c.recipe.name: c for c in result.candidates}
    assert {"fp32", "fp16-weights", "int8-dynamic", "int8-static-minmax"} <= set(names)
    assert all(c.status != "error" for c in result.candidates), [(c.recipe.name, c.reason) for c in result.candidates]
    assert names["fp16-weights"].passed  # W (256 floats) stored as fp16
    assert result.chosen.passed and result.chosen.fidelity is not None


def test_silero_vad_registers_and_builds_with_and_without_data(tmp_path: Path) -> None:
    folder = cache_dir() / "vad"
    assert (folder / "model.onnx").is_file(), f"{folder} is missing: run scripts/setup (fetch_models.py)"
    catalog = Catalog.open(tmp_path / "home")
    # without data: the synthetic sample rate (0 or 1) is outside what the model accepts (If on sr):
    # it still gets its fp32 build, recorded as not run here
    bare = catalog.add_model(folder / "model.onnx", "vad-bare")
    build, result = build_variant(catalog, bare, get_profile("x86-64-avx2"))
    assert build.variant == "fp32"
    assert any("synthetic" in n for n in result.provenance["notes"])
    # with its per-sample data: [N, 1, 512] audio, [N, 2, 1, 128] state, [N] sample rate
    mv = catalog.add_model(folder / "model.onnx", "vad", calibration=folder / "calibration.npz",
                           evaluation=folder / "evaluation.npz")
    options = BuildOptions(methods=("minmax",), fallback=False, evaluation_limit=64, calibration_limit=32,
                           latency_runs=3)
    build, result = build_variant(catalog, mv, get_profile("x86-64-vnni"), options=options)
    fp32 = next(c for c in result.candidates if c.recipe.name == "fp32")
    assert fp32.passed and fp32.fidelity is not None and fp32.fidelity.value > 0.999
    # ORT's constant folding inside the If bodies would grow it 1.4x: the fitted source ships instead
    assert fp32.size_bytes <= mv.size_bytes
    assert "graph optimization grew the model: fp32 kept unoptimized" in result.provenance["notes"]
    half = next(c for c in result.candidates if c.recipe.name == "fp16-weights")
    assert half.passed and half.size_bytes < 0.55 * mv.size_bytes, half.reason
    assert result.chosen.passed
