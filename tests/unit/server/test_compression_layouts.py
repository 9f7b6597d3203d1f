"""The gate on every output layout, and data sets for inputs of any layout (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.protocol.messages import TensorSpec
from server.compression.data import BATCH, SAMPLE, validate_arrays
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.errors import DatasetError

# a stateful recurrent model: batch-first audio, the state's batch on axis 1, a scalar sample rate
VAD_INPUTS = (
    TensorSpec("input", "float32", (-1, -1)),
    TensorSpec("state", "float32", (2, -1, 128)),
    TensorSpec("sr", "int64", ()),
)


def test_top1_compares_the_class_axis_per_position() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((4, 10, 6)).astype(np.float32)  # (samples, time steps, classes)
    cand = ref.copy()
    # flip one step's class: 1 of 40 (sample, step) positions disagrees
    step = cand[2, 7]
    a, b = int(step.argmax()), int(step.argmin())
    step[a], step[b] = step[b], step[a]
    fid = measure_fidelity([ref], [cand], GateSpec(metric="top1"), None)
    assert fid.top1_agreement == pytest.approx(39 / 40)
    # the old argmax(axis=1) ran along time: a change that keeps every step's class but moves the
    # time peak would have counted as a disagreement; per position it is full agreement
    scaled = ref * np.linspace(1.0, 2.0, 10, dtype=np.float32)[None, :, None]
    assert measure_fidelity([ref], [scaled], GateSpec(metric="top1"), None).top1_agreement == 1.0
    # rank 2 (samples, classes) is the classic case
    flat = rng.standard_normal((20, 5)).astype(np.float32)
    other = flat.copy()
    other[0] = -other[0]
    assert measure_fidelity([flat], [other], GateSpec(metric="top1"), None).top1_agreement == pytest.approx(0.95)


def test_top1_on_a_single_unit_output_is_a_thresholded_decision() -> None:
    ref = np.array([[0.1], [0.7], [0.4], [0.9]], dtype=np.float32)  # (samples, 1): a probability
    cand = np.array([[0.2], [0.6], [0.55], [0.8]], dtype=np.float32)
    fid = measure_fidelity([ref], [cand], GateSpec(metric="top1"), None)
    assert fid.top1_agreement == pytest.approx(0.75)  # sample 2 crossed 0.5
    assert "top1" in (check_fidelity(fid, GateSpec(metric="top1")) or "")


def test_iou_and_cosine_are_per_sample_whatever_the_layout() -> None:
    rng = np.random.default_rng(4)
    ref = rng.random((3, 1, 8, 8)).astype(np.float32)  # NCHW maps
    cand = ref.copy()
    cand[0] = 1.0 - cand[0]  # sample 0 inverted: its mask is the complement
    fid = measure_fidelity([ref], [cand], GateSpec(metric="iou"), None)
    assert fid.mean_iou is not None and 0.6 < fid.mean_iou < 0.7  # two samples 1.0, one ~0
    assert fid.min_cosine < fid.mean_cosine <= 1.0


def test_accuracy_labels_per_sample_or_per_position() -> None:
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((6, 4, 3)).astype(np.float32)
    labels = ref.argmax(axis=-1)  # one label per (sample, step)
    fid = measure_fidelity([ref], [ref], GateSpec(metric="accuracy"), labels)
    assert fid.value == 1.0 and fid.reference == 1.0
    with pytest.raises(DatasetError, match="label"):
        measure_fidelity([ref], [ref], GateSpec(metric="accuracy"), labels[:, 0])


def test_per_sample_layout_takes_any_input_layout_scalars_and_ints() -> None:
    n = 5
    raw: dict[str, np.ndarray] = {
        "input": np.zeros((n, 1, 512), dtype=np.float32),
        "state": np.zeros((n, 2, 1, 128), dtype=np.float32),
        "sr": np.full((n,), 16000, dtype=np.int64),
    }
    ds = validate_arrays(raw, VAD_INPUTS)
    assert ds.layout == SAMPLE and ds.samples == n
    feed = ds.feed(3)
    assert feed["state"].shape == (2, 1, 128) and feed["sr"].shape == () and int(feed["sr"]) == 16000
    assert [f["input"].shape for f in ds.batches(32)] == [(1, 512)] * n
    assert ds.take(2).layout == SAMPLE and ds.first(1)["sr"].shape == ()


def test_per_sample_layout_checks_every_fixed_dimension_and_kind() -> None:
    raw: dict[str, np.ndarray] = {
        "input": np.zeros((3, 1, 512), dtype=np.float32),
        "state": np.zeros((3, 3, 1, 128), dtype=np.float32),  # axis 1 must be 2
        "sr": np.full((3,), 16000, dtype=np.int64),
    }
    with pytest.raises(DatasetError, match=r"'state'.*axis 1 is 3, not 2"):
        validate_arrays(raw, VAD_INPUTS)
    raw["state"] = np.zeros((3, 2, 1, 128), dtype=np.float32)
    raw["sr"] = np.full((3,), 16000.0)
    with pytest.raises(DatasetError, match="expects int64"):
        validate_arrays(raw, VAD_INPUTS)


def test_the_old_batch_first_form_cannot_express_a_scalar_and_layouts_do_not_mix() -> None:
    raw: dict[str, np.ndarray] = {
        "input": np.zeros((3, 512), dtype=np.float32),  # batch-first
        "state": np.zeros((3, 2, 1, 128), dtype=np.float32),  # per-sample
        "sr": np.full((3,), 16000, dtype=np.int64),
    }
    with pytest.raises(DatasetError, match="mix layouts"):
        validate_arrays(raw, VAD_INPUTS)
    raw["sr"] = np.array(16000, dtype=np.int64)
    with pytest.raises(DatasetError, match=r"'sr'.*\[N\] \(per-sample layout\)"):
        validate_arrays(raw, VAD_INPUTS)
    image = (TensorSpec("x", "float32", (-1, 3, 8, 8)),)
    ds = validate_arrays({"x": np.zeros((4, 3, 8, 8))}, image)
    assert ds.layout == BATCH and ds.feed(1)["x"].shape == (1, 3, 8, 8)
