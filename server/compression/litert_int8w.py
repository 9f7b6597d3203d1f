"""LiteRT int8 weight storage: conv/FC weights kept as int8 constants behind a DEQUANTIZE op, fp32 compute.

MediaPipe's models already store fp16 weights behind DEQUANTIZE (version 3), so halving them means
int8. This rewrites only the stored constant: its type becomes INT8 with a symmetric scale (zero point
0, as LiteRT's conv kernels require of int8 weights) and the DEQUANTIZE op turns it back into the same
fp32 tensor the graph used before; a fp32 constant gets a new DEQUANTIZE in front of its op. Nothing
else in the graph changes, so the I/O types, the op set and the compute stay fp32: XNNPACK unpacks the
int8 constant into its packed fp32 weights at load (same speed as fp32), the builtin kernels run the
DEQUANTIZE once (it is constant).

Granularity per tensor, by bytes and by measured weight error: per-channel int8 costs one fp32 scale
and one int64 zero point per output channel (12 bytes), which on a 3x3 depthwise filter (9 weights a
channel) is more than the fp16 it replaces, so such tensors stay fp16 unless one scale for the whole
tensor is within ``max_tensor_error`` (relative L2 error of the dequantized weights); per-tensor is
also used wherever its error is within that bound, since it saves the 12 bytes a channel. With
calibration data the biases absorb the mean output shift the rounding causes (bias correction), and
``search`` picks per-tensor scales tensor by tensor, measured with the gate's metric.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from server.compression import litert_compact
from server.compression.data import Dataset
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.compression.litert_tools import FP16_MAX, _drop_unused_tensors, fix_operator_codes, run_preserving_tensors

#: (op name, weight input index, output-channel axis of the weight tensor, bias input index)
WEIGHT_OPS = {
    "CONV_2D": (1, 0, 2),
    "DEPTHWISE_CONV_2D": (1, 3, 2),
    "FULLY_CONNECTED": (1, 0, 2),
    "TRANSPOSE_CONV": (1, 0, 3),
}
#: bytes a per-channel scale costs in the flatbuffer: fp32 scale + int64 zero point
CHANNEL_PARAM_BYTES = 12
#: Smaller weights are left as they are.
MIN_ELEMENTS = 64
#: DEQUANTIZE op versions (LiteRT op versioning): 2 int8 per-tensor, 4 int8 per-channel.
DEQUANTIZE_INT8_VERSION = 2
DEQUANTIZE_INT8_PER_CHANNEL_VERSION = 2


@dataclass(frozen=True)
class Plan:
    """What happened to one weight tensor."""

    name: str
    elements: int
    channels: int
    granularity: str  # per-channel | per-tensor | kept
    error: float  # relative L2 error of the dequantized weights (0 when kept)


def quantize_symmetric(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 values in [-127, 127] and fp32 scales (one per slice along ``axis``, or one)."""
    if axis is None:
        amax = np.array([float(np.abs(values).max())], dtype=np.float64)
        scale = np.where(amax > 0, amax / 127.0, 1.0)
        q = np.clip(np.round(values / scale[0]), -127, 127)
    else:
        moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        amax = np.abs(moved).max(axis=1).astype(np.float64)
        scale = np.where(amax > 0, amax / 127.0, 1.0)
        shape = [1] * values.ndim
        shape[axis] = -1
        q = np.clip(np.round(values / scale.reshape(shape)), -127, 127)
    return q.astype(np.int8), scale.astype(np.float32)


def relative_error(values: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int | None) -> float:
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    restored = q.astype(np.float64) * scale.astype(np.float64).reshape(shape if axis is not None else [1])
    norm = float(np.linalg.norm(values))
    return float(np.linalg.norm(restored - values)) / norm if norm > 0 else 0.0


def choose(values: np.ndarray, axis: int, max_tensor_error: float) -> tuple[str, np.ndarray, np.ndarray, float]:
    """Granularity for one weight tensor: per-tensor within the error bound, else per-channel if it is
    smaller than fp16, else kept (``granularity``, int8 values, scales, error)."""
    q, scale = quantize_symmetric(values, None)
    err = relative_error(values, q, scale, None)
    if err <= max_tensor_error:
        return "per-tensor", q, scale, err
    channels = values.shape[axis]
    if values.size + CHANNEL_PARAM_BYTES * channels >= 2 * values.size:
        return "kept", q, scale, 0.0
    q, scale = quantize_symmetric(values, axis)
    return "per-channel", q, scale, relative_error(values, q, scale, axis)


def int8_weights(src: Path, dst: Path, *, max_tensor_error: float = 0.0, keep: Collection[str] = (),
                 per_tensor: Collection[str] = (), means: Mapping[str, np.ndarray] | None = None,
                 cache: dict[Any, Any] | None = None) -> list[Plan]:
    """Write ``src`` with its conv/FC weights stored as int8 (see the module doc); returns the plan.

    ``max_tensor_error`` 0 means per-channel wherever it is smaller than fp16 (per-tensor only for a
    tensor that quantizes exactly). ``keep``: weight tensors (by name) left as they are, ``per_tensor``:
    those given one scale whatever their error. ``means``: the mean of each op's input activation per
    channel (by tensor name; ``activation_means``): the expected output shift the rounded weights cause,
    ``(Wq - W) . E[x]``, is taken off the op's bias (bias correction, Nagel et al. 2019). ``cache``: kept
    between calls on the same ``src`` (the parsed model and each tensor's quantization), as ``search`` does.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    if cache is not None and "model" in cache:
        model: Any = copy.deepcopy(cache["model"])
    else:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
        fix_operator_codes(model)
        if cache is not None:
            cache["model"] = copy.deepcopy(model)
    op = schema.BuiltinOperator
    wanted = {getattr(op, name): spec for name, spec in WEIGHT_OPS.items()}
    codes: dict[int, int] = {}

    def dequantize_code(version: int) -> int:
        if version not in codes:
            code_t = schema.OperatorCodeT()
            code_t.builtinCode = code_t.deprecatedBuiltinCode = op.DEQUANTIZE
            code_t.version = version
            model.operatorCodes.append(code_t)
            codes[version] = len(model.operatorCodes) - 1
        return codes[version]

    def builtin(o: Any) -> int:
        return int(flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[o.opcodeIndex]))

    plans: list[Plan] = []
    for graph in model.subgraphs:
        producer = {int(t): o for o in graph.operators for t in o.outputs}
        done: set[int] = set()
        added = []
        folded: set[int] = set()
        for o in list(graph.operators):
            spec = wanted.get(builtin(o))
            if spec is None or len(o.inputs) <= spec[0] or o.inputs[spec[0]] < 0:
                continue
            index, axis, bias = int(o.inputs[spec[0]]), spec[1], spec[2]
            dq = producer.get(index)
            if dq is not None and builtin(dq) == op.DEQUANTIZE and len(dq.inputs) == 1:
                storage = int(dq.inputs[0])  # fp16 constant -> DEQUANTIZE -> weight
            elif dq is None:
                storage, dq = index, None  # fp32 constant
            else:
                continue
            if storage in done:
                continue
            t = graph.tensors[storage]
            data = model.buffers[t.buffer].data if 0 < t.buffer < len(model.buffers) else None
            already = t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale)
            if data is None or not len(data) or already or t.shape is None or len(t.shape) <= axis:
                continue
            raw = bytes(np.asarray(data, dtype=np.uint8))
            if t.type == schema.TensorType.FLOAT16 and dq is not None:
                values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
            elif t.type == schema.TensorType.FLOAT32:
                values = np.frombuffer(raw, dtype="<f4")
            else:
                continue
            values = values.reshape([int(d) for d in t.shape])
            name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            if values.size < MIN_ELEMENTS or not np.isfinite(values).all() or float(np.abs(values).max()) > FP16_MAX:
                continue
            if name in keep:
                granularity, q, scale, err = "kept", values, np.ones(1, np.float32), 0.0
            else:
                bound = math.inf if name in per_tensor else max_tensor_error
                chosen = cache.get((name, bound)) if cache is not None else None
                if chosen is None:
                    chosen = choose(values, axis, bound)
                    if cache is not None:
                        cache[(name, bound)] = chosen
                granularity, q, scale, err = chosen
            plans.append(Plan(name, int(values.size), int(values.shape[axis]), granularity, err))
            done.add(storage)
            if granularity == "kept":
                continue
            quant = schema.QuantizationParametersT()
            quant.scale = [float(s) for s in scale]
            quant.zeroPoint = [0] * len(scale)
            quant.quantizedDimension = axis if granularity == "per-channel" else 0
            version = DEQUANTIZE_INT8_PER_CHANNEL_VERSION if granularity == "per-channel" \
                else DEQUANTIZE_INT8_VERSION
            if dq is None:  # fp32 constant: it becomes the DEQUANTIZE output, a new int8 tensor the input
                stored = schema.TensorT()
                stored.shape, stored.name = t.shape, (name + "_int8").encode()
                stored.buffer = t.buffer
                t.buffer = 0
                graph.tensors.append(stored)
                storage = len(graph.tensors) - 1
                new = schema.OperatorT()
                new.inputs, new.outputs = [storage], [index]
                added.append(new)
                dq = new
            stored = graph.tensors[storage]
            stored.type = schema.TensorType.INT8
            stored.quantization = quant
            model.buffers[stored.buffer].data = np.frombuffer(q.tobytes(), dtype=np.uint8)
            dq.opcodeIndex = dequantize_code(version)
            if len(o.inputs) > bias and o.inputs[bias] >= 0:
                folded |= _fold_fp16_bias(model, graph, producer, int(o.inputs[bias]))
                act = graph.tensors[o.inputs[0 if builtin(o) != op.TRANSPOSE_CONV else 2]].name
                mean = (means or {}).get(act.decode() if isinstance(act, bytes) else str(act))
                if mean is not None:
                    shape = [1] * values.ndim
                    shape[quant.quantizedDimension] = -1
                    error = q.astype(np.float64) * scale.astype(np.float64).reshape(shape) - values
                    _correct_bias(model, graph.tensors[o.inputs[bias]], error, mean, builtin(o) == op.DEPTHWISE_CONV_2D)
        graph.operators = added + [o for o in graph.operators if id(o) not in folded]
    for index in range(len(model.subgraphs)):
        _drop_unused_tensors(model, index)
    _drop_unused_codes(model)
    litert_compact.strip(model)  # unread names out, identical arrays once (the graph's I/O names stay)
    dst.write_bytes(litert_compact.serialize(model))
    return plans


def _correct_bias(model: Any, bias: Any, error: np.ndarray, mean: np.ndarray, depthwise: bool) -> None:
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    data = model.buffers[bias.buffer].data if 0 < bias.buffer < len(model.buffers) else None
    if bias.type != schema.TensorType.FLOAT32 or data is None or not len(data):
        return
    values = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype="<f4").astype(np.float64)
    if depthwise:  # [1, H, W, C]: each output channel reads its own input channel
        if error.shape[-1] != mean.size:
            return
        shift = (error.reshape(-1, error.shape[-1]) * mean).sum(axis=0)
    else:  # [O, ..., I]
        if error.shape[-1] != mean.size:
            return
        shift = error.reshape(error.shape[0], -1, error.shape[-1]).sum(axis=1) @ mean
    if shift.shape != values.shape:
        return
    model.buffers[bias.buffer].data = np.frombuffer((values - shift).astype("<f4").tobytes(), dtype=np.uint8)


def activation_means(src: Path, data: Dataset) -> dict[str, np.ndarray]:
    """Per-channel mean (last axis) of every float tensor of ``src`` over ``data``, by tensor name."""
    sums: dict[str, np.ndarray] = {}
    for interp, details in run_preserving_tensors(src, data):
        for d in details:
            if np.dtype(d["dtype"]) != np.float32 or not len(d["shape"]):
                continue
            try:
                value = interp.get_tensor(d["index"])
            except ValueError:
                continue
            if value.size:
                m = value.reshape(-1, value.shape[-1]).astype(np.float64).mean(axis=0)
                sums[d["name"]] = sums.get(d["name"], 0) + m
    return {k: v / max(data.samples, 1) for k, v in sums.items()}


def _fold_fp16_bias(model: Any, graph: Any, producer: dict[int, Any], index: int) -> set[int]:
    """Make the bias of an op with int8 weights a fp32 constant when it comes from a fp16 DEQUANTIZE;
    returns the id of the DEQUANTIZE op to remove (empty when there is none).

    XNNPACK delegates a conv whose filter is int8 behind a DEQUANTIZE only when its bias is fp32: with
    a fp16 bias it left face_det's convs to the builtin kernels (2.9x fp32's latency).
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415

    dq = producer.get(index)
    if dq is None or len(dq.inputs) != 1:
        return set()
    half = graph.tensors[dq.inputs[0]]
    data = model.buffers[half.buffer].data if 0 < half.buffer < len(model.buffers) else None
    if half.type != schema.TensorType.FLOAT16 or data is None or not len(data):
        return set()
    values = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype="<f2").astype("<f4")
    model.buffers[half.buffer].data = np.frombuffer(values.tobytes(), dtype=np.uint8)
    graph.tensors[index].buffer, half.buffer = half.buffer, 0
    return {id(dq)}


def _drop_unused_codes(model: Any) -> None:
    """Remove operator codes no op uses any more (the fp16 DEQUANTIZE when every weight became int8)."""
    used = sorted({o.opcodeIndex for g in model.subgraphs for o in g.operators})
    if len(used) == len(model.operatorCodes):
        return
    new = {old: i for i, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for g in model.subgraphs:
        for o in g.operators:
            o.opcodeIndex = new[o.opcodeIndex]


#: Share of the gate's budget the search may spend on the calibration split (the rest is margin for the
#: evaluation split, which the gate then judges).
SEARCH_BUDGET_SHARE = 0.5


def _tighter(gate: GateSpec) -> GateSpec:
    share = SEARCH_BUDGET_SHARE
    return replace(gate, max_relative_drop=gate.max_relative_drop * share,
                   min_cosine=1 - (1 - gate.min_cosine) * share, min_top1=1 - (1 - gate.min_top1) * share,
                   min_iou=1 - (1 - gate.min_iou) * share)


def greedy(base: float, names: Sequence[str], measure: Callable[[Sequence[str]], tuple[float, bool]],
           saved: Callable[[str], int], *, noise: float = 0.0, prefix: bool = False) -> list[str]:
    """The names to switch (to one scale per tensor), by measured metric drop per byte saved.

    ``base``: the metric with none switched; ``saved(name)``: the bytes switching ``name`` alone saves
    (called right after ``measure([name])``, so it may read what that trial made); ``measure(names)``:
    the metric with ``names`` switched and whether that still passes. Each name is measured alone, then
    tried cheapest first on top of those kept (drops do not add up, so each step is measured):
    ``2 N`` trials for N names. ``noise``: added to every drop, so that drops within the metric's
    run-to-run noise (or a lucky rise) do not put a small saving ahead of a large one. ``prefix``: stop
    at the first name that fails (the rest save less each, at a cost the measurement cannot resolve).
    """
    cost = {}
    for name in names:
        value, _ = measure([name])
        gained = saved(name)
        if gained > 0:
            cost[name] = (max(base - value, 0.0) + noise) / gained
    chosen: list[str] = []
    for name in sorted(cost, key=lambda n: cost[n]):
        if measure([*chosen, name])[1]:
            chosen.append(name)
        elif prefix:
            break
    return chosen


def search(src: Path, dst: Path, data: Dataset, gate: GateSpec) -> list[Plan]:
    """Per-channel int8 weights, then one scale per tensor wherever the gate's metric can afford it.

    Measured on ``data`` (the calibration split) against the source's own outputs: each tensor alone
    is switched to per-tensor on top of the per-channel model and the metric's drop recorded; tensors are
    then tried in order of drop per byte saved, each kept per-tensor when the model still passes the gate
    with SEARCH_BUDGET_SHARE of its budget. Biases are corrected for the weights' rounding (``means``).
    ``2 N`` runs over ``data`` for N weight tensors.
    """
    from server.compression.runners import LiteRtRunner, run_dataset  # noqa: PLC0415

    reference = run_dataset(LiteRtRunner(src), data)
    means = activation_means(src, data)
    strict = _tighter(gate)
    cache: dict[Any, Any] = {}
    trial = dst.with_name(dst.stem + ".trial.tflite")

    def measure(per_tensor: Collection[str]) -> tuple[float, bool]:
        int8_weights(src, trial, per_tensor=per_tensor, means=means, cache=cache)
        fid = measure_fidelity(reference, run_dataset(LiteRtRunner(trial), data), strict, data.labels)
        return fid.value, check_fidelity(fid, strict) is None

    plans = int8_weights(src, dst, means=means, cache=cache)
    base, ok = measure(())
    if not ok:
        return plans  # per-channel already spends the budget: the gate will judge it as it is
    savings = {p.name: CHANNEL_PARAM_BYTES * (p.channels - 1) if p.granularity == "per-channel"
               else p.elements - CHANNEL_PARAM_BYTES for p in plans if p.granularity != "per-tensor"}
    chosen = greedy(base, [n for n, saved in savings.items() if saved > 0], measure, savings.__getitem__)
    trial.unlink(missing_ok=True)
    return int8_weights(src, dst, per_tensor=chosen, means=means, cache=cache)
