"""Pure parts of the compression pipeline: codec choice, the gate's rules, data-set validation, refs."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from agent.protocol.messages import TensorSpec
from server.compression.codec import choose_codec, ota_size
from server.compression.data import validate_arrays
from server.compression.gate import GateSpec, Scored, check_fidelity, measure_fidelity, select
from server.compression.recipes import int8_flavour, plan
from server.errors import DatasetError, InvalidRequestError
from server.profiles import load_profiles
from server.refs import parse_ref


def test_codec_picks_lzma_for_compressible_and_none_for_random_bytes() -> None:
    zeros = bytes(200_000)
    c = choose_codec(zeros)
    assert c.compression == "lzma" and c.compressed_size < len(zeros) // 10
    noise = os.urandom(100_000)
    n = choose_codec(noise)
    assert n.compression == "none" and n.compressed_size == len(noise)
    # big files are judged on a sample, and say so
    big = choose_codec(bytes(9 << 20))
    assert big.estimated and big.compression == "lzma" and big.compressed_size < (9 << 20) // 10
    assert not c.estimated
    # each sealed chunk adds a header and a tag
    assert ota_size(1000, 1024) > 1000
    assert ota_size(4096, 1024) - ota_size(4096, 4096) == 3 * (ota_size(10, 1024) - 10)


def test_select_prefers_small_passing_variants_and_never_ships_a_failure() -> None:
    fp32 = Scored("fp32", True, 1000, 10.0)
    small_fail = Scored("int8-a", False, 100, 5.0)
    mid_pass = Scored("int8-b", True, 300, 6.0)
    assert select([fp32, small_fail, mid_pass], 10.0) == mid_pass
    assert select([Scored("fp32", False, 1000, 10.0), small_fail], 10.0) is None  # caller ships fp32
    # a passing variant much slower than fp32 loses to a faster one even if smaller
    slow = Scored("int8-slow", True, 100, 20.0)
    assert select([fp32, slow], 10.0) == fp32
    # ... but not over sub-0.1 ms noise
    picked = select([Scored("fp32", True, 1000, 0.02), Scored("q", True, 300, 0.03)], 0.02)
    assert picked is not None and picked.name == "q"
    # near-equal sizes: the more faithful wins, unless (balanced) the other is clearly faster
    a, b = Scored("a", True, 300, 6.8, 0.985), Scored("b", True, 310, 7.0, 0.99)
    assert select([fp32, a, b], 10.0) == b
    fast_a = Scored("a", True, 300, 6.0, 0.985)
    assert select([fp32, fast_a, b], 10.0, optimize="size") == b
    assert select([fp32, fast_a, b], 10.0) == fast_a


def test_fidelity_metrics_and_thresholds() -> None:
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((50, 10)).astype(np.float32)]
    labels = ref[0].argmax(axis=1)
    same = measure_fidelity(ref, [ref[0].copy()], GateSpec(metric="accuracy"), labels)
    assert same.value == 1.0 and same.reference == 1.0 and same.min_cosine > 0.9999
    assert check_fidelity(same, GateSpec(metric="accuracy")) is None
    noisy = [ref[0] + rng.standard_normal((50, 10)).astype(np.float32)]
    fid = measure_fidelity(ref, noisy, GateSpec(metric="cosine"), None)
    assert fid.min_cosine < 0.99 and fid.top1_agreement < 1.0
    assert "cosine" in (check_fidelity(fid, GateSpec(metric="cosine")) or "")
    acc = measure_fidelity(ref, noisy, GateSpec(metric="accuracy"), labels)
    assert "relative drop" in (check_fidelity(acc, GateSpec(metric="accuracy")) or "")
    with pytest.raises(DatasetError, match="labels"):
        measure_fidelity(ref, noisy, GateSpec(metric="accuracy"), None)
    with pytest.raises(DatasetError, match="unknown metric"):
        GateSpec(metric="f1")
    nan = [np.full((50, 10), np.nan, dtype=np.float32)]
    assert check_fidelity(measure_fidelity(ref, nan, GateSpec(metric="cosine"), None), GateSpec()) is not None


def test_dataset_validation_names_the_problem() -> None:
    spec = (TensorSpec("x", "float32", (-1, 1, 8, 8)),)
    ok = validate_arrays({"x": np.zeros((4, 1, 8, 8)), "labels": np.arange(4)}, spec)
    assert ok.samples == 4 and ok.arrays["x"].dtype == np.float32
    with pytest.raises(DatasetError, match="no array for model input"):
        validate_arrays({"y": np.zeros((4, 1, 8, 8))}, spec)
    with pytest.raises(DatasetError, match=r"axis 2 is 7, not 8"):
        validate_arrays({"x": np.zeros((4, 1, 7, 8))}, spec, role="calibration")
    with pytest.raises(DatasetError, match="per-sample layout"):
        validate_arrays({"x": np.zeros((4, 64))}, spec)
    with pytest.raises(DatasetError, match="labels"):
        validate_arrays({"x": np.zeros((4, 1, 8, 8)), "labels": np.arange(3)}, spec)
    with pytest.raises(DatasetError, match="NaN"):
        validate_arrays({"x": np.full((4, 1, 8, 8), np.nan)}, spec)
    ids = (TensorSpec("ids", "int64", (-1, 16)),)
    with pytest.raises(DatasetError, match="expects int64"):
        validate_arrays({"ids": np.zeros((2, 16), dtype=np.float32)}, ids)


def test_recipes_follow_the_profile() -> None:
    profiles = load_profiles()
    ops = frozenset({"MatMul", "Conv"})
    names = {p: [r.name for r in plan(profiles[p], "onnx", ops=ops, has_calibration=True)] for p in profiles
             if "onnx" in profiles[p].format_preference}
    assert "fp16" in names["jetson-nano"] and not any("int8" in n for n in names["jetson-nano"])
    assert "fp16" not in names["x86-64-avx2"] and "int8-dynamic" in names["x86-64-avx2"]
    assert int8_flavour(profiles["x86-64-avx2"]) == {"signed_activations": False, "reduce_range": True}
    assert int8_flavour(profiles["x86-64-vnni"]) == {"signed_activations": False, "reduce_range": False}
    assert int8_flavour(profiles["raspberry-pi-4"]) == {"signed_activations": True, "reduce_range": False}
    coral = [r.name for r in plan(profiles["coral-dev-board"], "tflite", ops=frozenset(), has_calibration=True)]
    assert coral == ["litert-static-wi8-ai8"]  # the Edge TPU runs full int8 only
    no_calib = [r.name for r in plan(profiles["x86-64-avx2"], "onnx", ops=frozenset({"Conv"}), has_calibration=False)]
    assert not any(n.startswith("int8-static") for n in no_calib)


def test_model_refs() -> None:
    assert parse_ref("digits:3") == ("digits", 3)
    assert parse_ref("digits") == ("digits", None)
    for bad in ("", "a b:1", "x:0", "x:v1"):
        with pytest.raises(InvalidRequestError):
            parse_ref(bad)
    with pytest.raises(InvalidRequestError, match="version"):
        parse_ref("digits", need_version=True)


def test_select_never_sets_aside_a_variant_that_computes_in_fp32_on_latency() -> None:
    """Injected timings as a busy machine gives them: fp16-weights (fp32's kernels) timed 1.3x fp32's."""
    recipes = {r.name: r for r in plan(load_profiles()["x86-64-avx2"], "onnx", ops=frozenset({"Conv", "MatMul"}),
                                       has_calibration=True)}
    fp32_recipe, fp16w, dynamic = recipes["fp32"], recipes["fp16-weights"], recipes["int8-dynamic"]
    assert fp32_recipe.fp32_compute and fp16w.fp32_compute and not dynamic.fp32_compute
    assert fp16w.to_dict()["compute"] == "float32" and dynamic.to_dict()["compute"] == "int8"
    fp32 = Scored("fp32", True, 10_000, 12.0, 1.0, fp16w.fp32_compute)
    half = Scored("fp16-weights", True, 5_030, 15.6, 0.9996, fp16w.fp32_compute)  # noise: 1.3x fp32
    int8 = Scored("int8-dynamic", True, 7_200, 11.9, 0.9965, dynamic.fp32_compute)
    assert select([fp32, half, int8], 12.0) == half  # PP-OCRv4 rec's run: it shipped int8-dynamic (0.72x) before
    # without the recipe's metadata the same timings set it aside (what happened)
    assert select([fp32, replace(half, fp32_compute=False), int8], 12.0) == int8
    # an int8 variant that is really slower is still set aside on the same timings
    slow_int8 = Scored("int8-static", True, 2_900, 15.6, 0.995, False)
    assert select([fp32, half, slow_int8], 12.0) == half
