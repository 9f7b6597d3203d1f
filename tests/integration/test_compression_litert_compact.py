"""Smaller full-int8 .tflite files (``litert_compact``, ``litert_int8.per_tensor_search``), on real models.

Compaction must leave the computation bit for bit as it was, on XNNPACK and on the builtin kernels, keep
the names clients read, and the agent must serve the result. One weight scale per tensor is chosen
where face_det's gate affords it, and the file then beats LiteRT Quantizer's own recipes in size.
"""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from server.compression import litert_compact, litert_graph, litert_int8, litert_int8w, litert_tools
from server.compression.gate import GateSpec, measure_fidelity
from server.compression.runners import LiteRtRunner, run_dataset
from tests.integration.test_compression_litert_int8 import _agent_serves, _loads_both_ways, _split
from tests.support.models import real_model


def _quant_arrays(path: Path) -> tuple[int, int, int]:
    """(tensors with a name, tensors with calibration min/max, buffers) of ``path``."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    tensors = [t for g in model.subgraphs for t in g.tensors]
    named = sum(1 for t in tensors if t.name)
    ranged = sum(1 for t in tensors if t.quantization is not None and t.quantization.min is not None)
    return named, ranged, len(model.buffers)


def test_compaction_computes_the_same_bit_for_bit_and_keeps_the_io_names(tmp_path: Path) -> None:
    source = real_model("face_det").path
    cal = _split("face_det", "calibration", 8)
    quantized = tmp_path / "quantized.tflite"  # LiteRT Quantizer's own full-int8 file, not compacted
    litert_tools.quantize(source, quantized, "static_wi8_ai8", cal)
    small = tmp_path / "small.tflite"
    made = litert_compact.compact(quantized, small)
    assert made.before == quantized.stat().st_size and made.after == small.stat().st_size
    assert made.after < 0.85 * made.before, made  # measured: 0.80x (names, min/max, zero points stored once)
    assert made.names > 100 and made.buffers > 0 and made.ranges == 0, made  # the quantizer writes no min/max
    named, ranged, buffers = _quant_arrays(small)
    assert named == 3 and ranged == 0  # the input and the two outputs keep theirs
    assert buffers < _quant_arrays(quantized)[2]
    assert litert_tools.io_specs(small) == litert_tools.io_specs(quantized)
    feed = cal.feed(0)
    for xnnpack in (True, False):
        for a, b in zip(LiteRtRunner(quantized, xnnpack=xnnpack).run(feed),
                        LiteRtRunner(small, xnnpack=xnnpack).run(feed), strict=True):
            np.testing.assert_array_equal(a, b)
    again = tmp_path / "again.tflite"
    assert litert_compact.compact(small, again).after == made.after  # nothing left to take


def test_identical_arrays_are_stored_once(tmp_path: Path) -> None:
    """A second constant tensor with the same contents ends up on the first one's buffer; calibration
    min/max (TF's converter writes them) go."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(real_model("face_det").path.read_bytes()))
    graph = model.subgraphs[0]
    big = max((t for t in graph.tensors if model.buffers[t.buffer].data is not None),
              key=lambda t: len(model.buffers[t.buffer].data))
    size = len(model.buffers[big.buffer].data)
    copy_buffer = schema.BufferT()
    copy_buffer.data = np.array(model.buffers[big.buffer].data, dtype=np.uint8)
    model.buffers.append(copy_buffer)
    twin = schema.TensorT()  # a graph output, so that it is kept
    twin.shape, twin.type, twin.name, twin.buffer = big.shape, big.type, b"twin", len(model.buffers) - 1
    graph.tensors.append(twin)
    ranged = schema.QuantizationParametersT()
    ranged.min, ranged.max = [-1.0], [1.0]
    big.quantization = ranged
    graph.outputs = [*graph.outputs, len(graph.tensors) - 1]
    doubled = tmp_path / "doubled.tflite"
    doubled.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    out = tmp_path / "out.tflite"
    made = litert_compact.compact(doubled, out)
    assert made.after < doubled.stat().st_size - size and made.buffers >= 1 and made.ranges == 1
    g = flatbuffer_utils.read_model_from_bytearray(bytearray(out.read_bytes())).subgraphs[0]
    kept = next(t for t in g.tensors if t.name == b"twin")
    assert sum(1 for t in g.tensors if t.buffer == kept.buffer) == 2
    assert all(t.quantization is None or t.quantization.min is None for t in g.tensors)


def test_face_det_full_int8_beats_litert_quantizers_recipes_in_size_and_passes_its_gate(tmp_path: Path) -> None:
    rm = real_model("face_det")
    cal, ev = _split("face_det", "calibration", 48), _split("face_det", "evaluation", 96)
    gate = GateSpec(metric=rm.metric)
    out = tmp_path / "int8.tflite"
    made = litert_int8.static_int8(rm.path, out, cal, gate=gate)
    # the late 1x1 convs take one scale (measured: conv2d_12..16 and regressor_16); early convs never
    assert made.per_tensor and not {"activation;", "conv2d_1;", "depthwise_conv2d;"} & set(made.per_tensor)
    assert made.delegation.complete and made.delegation.partitions == 1, made.delegation.describe()
    reference = run_dataset(LiteRtRunner(rm.path), ev)
    fid = measure_fidelity(reference, run_dataset(LiteRtRunner(out), ev), gate, None)
    assert fid.min_cosine >= gate.min_cosine, (made, fid.min_cosine)
    peers = {}
    for recipe in ("dynamic_wi8_afp32", "weight_only_wi8_afp32"):
        peer = tmp_path / f"{recipe}.tflite"
        litert_tools.quantize(rm.path, peer, recipe)
        peers[recipe] = peer
    ours = out.read_bytes()
    for recipe, peer in peers.items():  # file bytes, and after the transfer codec
        assert len(ours) < peer.stat().st_size, recipe
        assert len(lzma.compress(ours)) < len(lzma.compress(peer.read_bytes())), recipe
    _loads_both_ways(out, ev.feed(0))
    _agent_serves(out, rm, ev.feed(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no intermediates left
        ["int8.tflite", *(f"{r}.tflite" for r in peers), *(f"{r}.fp32.tflite" for r in peers)])


def test_greedy_orders_by_drop_per_byte_and_a_prefix_stops_at_the_first_failure() -> None:
    drops = {"a": 0.0, "b": 0.5, "c": 0.1, "d": 0.0}
    saved = {"a": 10, "b": 1000, "c": 100, "d": 0}
    trials: list[tuple[str, ...]] = []

    def measure(names: Sequence[str]) -> tuple[float, bool]:
        chosen = tuple(names)
        trials.append(chosen)
        total = sum(drops[n] for n in chosen)
        return 1.0 - total, total <= 0.2

    # drop per byte: a 0/10, b 0.5/1000, c 0.1/100; d saves nothing and is never tried on top
    assert litert_int8w.greedy(1.0, list(drops), measure, saved.__getitem__) == ["a", "c"]
    assert trials[4:] == [("a",), ("a", "b"), ("a", "c")]
    # a noise floor puts the big saving first: b fails, and a prefix stops there
    trials.clear()
    assert litert_int8w.greedy(1.0, list(drops), measure, saved.__getitem__, noise=1.0, prefix=True) == []
    assert trials[4:] == [("b",)]


def test_a_model_without_slack_gets_no_per_tensor_weights(tmp_path: Path) -> None:
    source = real_model("face_det").path
    cal = _split("face_det", "calibration", 8)
    out = tmp_path / "int8.tflite"
    never = GateSpec(metric="cosine", min_cosine=1.0)
    made = litert_int8.static_int8(source, out, cal, gate=never, powers=(), fractions=(0.0,))
    assert made.per_tensor == ()
    assert litert_graph.delegation(out).complete
