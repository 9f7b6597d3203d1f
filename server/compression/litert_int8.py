"""LiteRT full int8 (``litert-static-wi8-ai8``) that XNNPACK runs end to end, with measured float fallback.

Four things stood between LiteRT Quantizer's ``static_wi8_ai8`` and an int8 model faster than fp32:

* **Standalone activations.** XNNPACK leaves an int8 RELU to the builtin kernels; MediaPipe's face
  detector has 17 of them, which split its graph into 18 XNNPACK partitions (6x fp32's latency). They are
  fused into the op before them in the float graph first (``litert_graph.fuse_activations``: the same
  computation), so the quantizer quantizes the fused op and XNNPACK takes every op.
* **Ranges.** The quantizer's calibrator folds each sample's min/max into a moving average (weight 0.95
  on the past), which leaves the ranges near the typical sample's and clips the activations of the
  unusual ones; the gate judges the *worst* sample. Here each calibration sample is calibrated alone and
  the ranges are the min and max over all samples (``RANGES``: ``minmax``; ``ema`` is the quantizer's own).
* **Outlier channels.** A depthwise conv feeding a conv with nothing between them can move a per-channel
  scale from one to the other (cross-layer equalization, ``equalize``): face_det's depthwise outputs,
  one per-tensor int8 scale each, had single channels at -141 where the rest stayed within +-20.
  Worst-sample cosine 0.976 -> 0.984 (``power`` 0.5) or 0.992 (0.75); which strength is measured.
* **Sensitive tails.** Where int8 everywhere still fails the gate on the calibration split, the last ops
  of the graph (detection heads, the concatenation of outputs with different ranges) are kept in float,
  more each round (``TAIL_FRACTIONS`` of the quantizable ops), until the model passes with
  ``litert_int8w.SEARCH_BUDGET_SHARE`` of the gate's budget; their weights are stored as fp16.

Then the file is made small (docs/compression.md "File size"): ``per_tensor_search`` gives the ops the
gate can afford it one weight scale instead of one per channel, and every file is compacted
(``litert_compact``: unread names out, identical arrays stored once).

Not solved here: XNNPACK has no int8 PRELU (face_mesh's 23 stay float inside the partition, 0.78-0.86x
fp32), and selfie's AVERAGE_POOL_2D and HARD_SWISH stay on the builtin kernels (docs/compression.md).
"""

from __future__ import annotations

import contextlib
import io
import lzma
import math
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.compression import litert_compact, litert_graph, litert_tools
from server.compression.data import Dataset
from server.compression.gate import Fidelity, GateSpec, check_fidelity, measure_fidelity, shortfall
from server.errors import ModelError

#: How per-sample ranges combine: min/max over all samples, a quantile of the per-sample extremes (q95:
#: the 95th percentile of the maxima), or the quantizer's own moving average (face_det's worst-sample
#: cosine 0.976 / 0.974 (q95) / 0.976 (q90) / 0.914 (q75) / 0.909 (ema)).
RANGES = ("minmax", "q99", "q95", "q90", "q75", "ema")
#: Share of the quantizable ops kept in float from the end of the graph, tried in this order.
TAIL_FRACTIONS = (0.0, 0.1, 0.2, 0.35)
#: Equalization strengths tried (``equalize``'s ``power``): 0.5 balances activation and weight ranges
#: (Nagel et al.), 1 equalizes the activations alone. face_det's worst-sample cosine on 96 images (minmax
#: ranges): none 0.976, 0.5 0.984, 0.65 0.981, 0.7 0.985, 0.75 0.992, 0.8 0.982, 1.0 0.979: not smooth, so
#: the search measures each on the calibration split.
EQUALIZE_POWERS = (0.5, 0.75, 1.0)
#: A candidate this far below the gate's floor (metric units) ends the search after the first tail: the float
#: tails closed at most ~0.01 (face_det 0.976 -> 0.987 with half its ops float); selfie's IoU is 0.6 short.
HOPELESS_SHORTFALL = 0.05
#: Ops that carry no arithmetic of their own: not counted when sizing a float tail.
_NO_COMPUTE = {"RESHAPE", "QUANTIZE", "DEQUANTIZE"}


@dataclass(frozen=True)
class StaticInt8:
    """What ``static_int8`` made."""

    fused: int  # standalone activations fused into the op before them
    equalized: int  # depthwise -> conv pairs equalized
    power: float | None  # the equalization's EQUALIZE_POWERS entry (None: not equalized)
    float_ops: tuple[str, ...]  # op scopes (output tensor names) kept in float
    fidelity: float | None  # the gate's metric on the calibration split (None without a gate)
    delegation: litert_graph.Delegation
    per_tensor: tuple[str, ...] = ()  # op scopes whose weights have one scale (``per_tensor_search``)


def _quantizer() -> tuple[Any, Any, Any, Any]:
    try:
        from litert_quantizer import algorithm_manager, qtyping, recipe_manager  # noqa: PLC0415
        from litert_quantizer import quantizer as lq  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError("LiteRT Quantizer is not installed (pip install litert-quantizer)") from exc
    return lq, recipe_manager, algorithm_manager, qtyping


def _scope_regex(scopes: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(s) for s in scopes) + ")$"


def _recipe(float_scopes: Sequence[str], per_tensor: Sequence[str] = ()) -> Any:
    _, recipe_manager, algorithm_manager, qtyping = _quantizer()
    rm = recipe_manager.RecipeManager()
    rm.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                         activation_num_bits=8, weight_num_bits=8)
    if per_tensor:  # one weight scale for these ops (the latest matching config wins)
        rm.add_static_config(regex=_scope_regex(per_tensor), operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                             activation_num_bits=8, weight_num_bits=8,
                             weight_granularity=qtyping.QuantGranularity.TENSORWISE)
    if float_scopes:  # an op's scope is its output tensor names, each followed by ";"
        rm.add_quantization_config(regex=_scope_regex(float_scopes),
                                   operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                   algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    return rm.get_quantization_recipe()


def calibrate(model: Path, data: Dataset, ranges: str = "minmax") -> dict[str, Any]:
    """Tensor ranges (LiteRT Quantizer's calibration result) over ``data``: per sample, then combined."""
    if ranges not in RANGES:
        raise ModelError(f"unknown range rule {ranges!r} (one of {', '.join(RANGES)})")
    lq, *_ = _quantizer()
    key, args = litert_tools._signature(model)
    q = lq.Quantizer(str(model))
    q.load_quantization_recipe(_recipe(()))
    samples = [{args.get(n, n): a for n, a in data.feed(i).items()} for i in range(data.samples)]
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        # its tqdm bars would garble the CLI's progress bar; it preserves all tensors ("for debugging"): it must
        warnings.simplefilter("ignore", UserWarning)
        if ranges == "ema":
            return dict(q.calibrate({key: samples}, num_threads=1))
        per_sample: dict[str, list[Any]] = {}
        for sample in samples:
            for name, qsv in q.calibrate({key: [sample]}, num_threads=1).items():
                per_sample.setdefault(name, []).append(qsv)
    quantile = 1.0 if ranges == "minmax" else int(ranges[1:]) / 100
    combined: dict[str, Any] = {}
    for name, qsvs in per_sample.items():
        found = [x for x in qsvs if x]
        if not found:
            combined[name] = qsvs[0]
            continue
        lows = np.stack([np.asarray(x["min"], dtype=np.float64) for x in found])
        highs = np.stack([np.asarray(x["max"], dtype=np.float64) for x in found])
        combined[name] = {"min": np.quantile(lows, 1 - quantile, axis=0).astype(np.float32),
                          "max": np.quantile(highs, quantile, axis=0).astype(np.float32)}
    return combined


def _scopes(model: Path) -> list[tuple[str, str]]:
    """(op name, scope) of each op of the primary subgraph in graph order; scope as the quantizer reads it."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415
    from litert_quantizer.utils import tfl_flatbuffer_utils  # noqa: PLC0415

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(model.read_bytes()))
    graph = m.subgraphs[0]
    out = []
    for op in graph.operators:
        code = flatbuffer_utils.get_builtin_code_from_operator_code(m.operatorCodes[op.opcodeIndex])
        out.append((names.get(code, str(code)), tfl_flatbuffer_utils.get_op_scope(op, graph.tensors)))
    return out


def tail(scopes: Sequence[tuple[str, str]], fraction: float) -> tuple[str, ...]:
    """The scopes of the last ops that make up ``fraction`` of the compute ops (with the non-compute ops
    among and after them), at least one compute op when ``fraction`` > 0."""
    compute = [i for i, (name, _) in enumerate(scopes) if name not in _NO_COMPUTE]
    if fraction <= 0 or not compute:
        return ()
    k = max(1, math.ceil(len(compute) * fraction))
    start = compute[-k]
    return tuple(scope for name, scope in scopes[start:] if name not in {"QUANTIZE", "DEQUANTIZE"})


def _quantize(model: Path, dst: Path, calibration: dict[str, Any], float_scopes: Sequence[str],
              float_io: bool, *, per_tensor: Sequence[str] = ()) -> None:
    lq, *_ = _quantizer()
    q = lq.Quantizer(str(model))
    q.load_quantization_recipe(_recipe(float_scopes, per_tensor))
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "preserve_all_tensors ... for debugging": it validates
        result = q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
    if result.quantized_model is None:
        raise ModelError("LiteRT Quantizer produced no model for static_wi8_ai8")
    raw = dst.with_name(dst.stem + ".int8-io.tflite")
    raw.write_bytes(bytes(result.quantized_model))
    staged = raw
    if float_io:
        staged = dst.with_name(dst.stem + ".float-io.tflite")
        litert_tools.float_io(raw, staged)
    if float_scopes:  # the float ops' weights: fp16 behind DEQUANTIZE, as MediaPipe ships them
        litert_tools.fp16_weights(staged, dst)
        staged = dst
    litert_compact.compact(staged, dst)  # names, ranges, spare buffers out; identical arrays once


def static_int8(src: Path, dst: Path, calibration: Dataset, *, gate: GateSpec | None = None,
                float_io: bool = True, ranges: str = "minmax", powers: Sequence[float] = EQUALIZE_POWERS,
                fractions: Sequence[float] = TAIL_FRACTIONS) -> StaticInt8:
    """Full int8 of ``src`` into ``dst`` (see the module doc). Without ``gate``: equalized with
    ``powers[0]`` (none when empty), no float tail. With it: the smallest float tail, each tail with every
    power, that passes it on ``calibration`` with SEARCH_BUDGET_SHARE of its budget; failing that, the
    first that passes the gate itself there, else the most faithful (the gate then judges it on the
    evaluation split). Intermediate files go next to ``dst`` and are removed."""
    staged = [dst.with_name(dst.stem + suffix) for suffix in (".fused.tflite", ".fp32.tflite", ".signed.tflite",
                                                              ".trial.tflite", ".equalized.tflite")]
    try:
        return _static_int8(src, dst, staged, calibration, gate=gate, float_io=float_io, ranges=ranges,
                            powers=powers, fractions=fractions)
    finally:
        for path in [*staged, *(p.with_name(p.stem + s) for p in (dst, staged[3])
                                for s in (".int8-io.tflite", ".float-io.tflite"))]:
            path.unlink(missing_ok=True)


def _static_int8(src: Path, dst: Path, staged: list[Path], calibration: Dataset, *, gate: GateSpec | None,
                 float_io: bool, ranges: str, powers: Sequence[float], fractions: Sequence[float]) -> StaticInt8:
    from server.compression.litert_int8w import _tighter  # noqa: PLC0415
    from server.compression.runners import LiteRtRunner, run_dataset  # noqa: PLC0415

    fused_path, folded, signed, trial, equalized = staged
    fused = litert_graph.fuse_activations(src, fused_path)
    litert_tools.fold_fp16_weights(fused_path, folded)
    prepared: dict[float | None, tuple[Path, int, dict[str, Any]]] = {}

    def prepare(power: float | None) -> tuple[Path, int, dict[str, Any]]:
        """The float model to quantize (equalized with ``power``), its equalized pairs and its ranges."""
        if power not in prepared:
            pairs = equalize(folded, equalized, calibration, power) if power is not None else 0
            model = signed.with_name(f"{signed.stem}.{len(prepared)}.tflite")
            staged.append(model)
            litert_tools.with_default_signature(equalized if pairs else folded, model)
            prepared[power] = (model, pairs, calibrate(model, calibration, ranges))
        return prepared[power]

    options: list[float | None] = list(powers) or [None]
    if gate is None:
        model, pairs, ranges_result = prepare(options[0])
        _quantize(model, dst, ranges_result, (), float_io)
        return StaticInt8(fused, pairs, options[0], (), None, litert_graph.delegation(dst))
    strict = _tighter(gate)
    reference = run_dataset(LiteRtRunner(src), calibration)
    results: list[tuple[Fidelity, bool, float | None, tuple[str, ...]]] = []  # passes the gate, power, tail
    closest = math.inf
    for fraction in fractions:  # the cheapest float tail first, each with every equalization
        for power in options:
            model, _, ranges_result = prepare(power)
            floats = tail(_scopes(model), fraction)
            if any(r[2] == power and r[3] == floats for r in results):
                continue
            _quantize(model, trial, ranges_result, floats, float_io)
            fid = measure_fidelity(reference, run_dataset(LiteRtRunner(trial), calibration), strict,
                                   calibration.labels)
            if check_fidelity(fid, strict) is None:  # passes with a margin: done
                return _finish(prepared[power], dst, fused=fused, power=power, floats=floats, fid=fid,
                               float_io=float_io, calibration=calibration, gate=gate, reference=reference)
            results.append((fid, check_fidelity(fid, gate) is None, power, floats))
            closest = min(closest, shortfall(fid, gate))
        if closest > HOPELESS_SHORTFALL:  # no float tail closes such a gap: spare the build the other tails
            break
    if not results:
        raise ModelError("no float-tail fraction to try")
    # no margin anywhere: the first (cheapest) that passes the gate itself on calibration, else the most faithful
    fid, _, power, floats = next((r for r in results if r[1]), max(results, key=lambda r: r[0].value))
    return _finish(prepare(power), dst, fused=fused, power=power, floats=floats, fid=fid, float_io=float_io,
                   calibration=calibration, gate=gate, reference=reference)


def _finish(prepared: tuple[Path, int, dict[str, Any]], dst: Path, *, fused: int, power: float | None,
            floats: tuple[str, ...], fid: Fidelity, float_io: bool, calibration: Dataset, gate: GateSpec,
            reference: list[Any]) -> StaticInt8:
    """The chosen power and tail, with one weight scale wherever the gate affords it, into ``dst``."""
    model, pairs, ranges = prepared
    chosen, fid = per_tensor_search(model, dst, ranges, floats=floats, float_io=float_io, calibration=calibration,
                                    gate=gate, reference=reference, base=fid)
    _quantize(model, dst, ranges, floats, float_io, per_tensor=chosen)
    return StaticInt8(fused, pairs, power, floats, fid.value, litert_graph.delegation(dst), chosen)


#: Ops whose int8 weights may get one scale for the whole tensor (``per_tensor_search``).
PER_TENSOR_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
#: Mean-cosine changes this small are noise when ranking ops (face_det's single-op changes on its 48
#: calibration images spread over +-1.5e-4, rises included).
MEAN_COSINE_NOISE = 3e-4
#: The mean cosine may fall by this share of the margin kept on the worst sample. face_det's evaluation
#: split, worst-sample cosine 0.9924 all per-channel: without the stop at the first failure the shares
#: 0.5 / 0.25 / 0.125 took 19 / 13 / 10 ops and 0.989 / 0.986 / 0.989 (fails); with it 0.25 takes 6: 0.9929.
MEAN_COSINE_SHARE = 0.25


def per_tensor_search(model: Path, dst: Path, ranges: dict[str, Any], *, floats: Sequence[str], float_io: bool,
                      calibration: Dataset, gate: GateSpec, reference: list[Any],
                      base: Fidelity) -> tuple[tuple[str, ...], Fidelity]:
    """The int8 ops (scopes) of ``model`` whose weights get one scale instead of one per output channel,
    and the metric then, on ``calibration``.

    One scale saves the per-channel weight and bias scales, and leaves the small-range channels' int8
    weights near zero, which the transfer codec packs far tighter (face_det with every conv so: 112 KB
    -> 77 KB after lzma, worst-sample cosine 0.992 -> 0.974). Chosen by ``litert_int8w.greedy``: ordered
    by the drop of the *mean* cosine per byte saved after the codec (the worst sample of 48 is too noisy
    to rank by: single early convs "raised" it on calibration and cost 0.003-0.015 on the evaluation
    split's), each kept while the gate's metric keeps ``SEARCH_BUDGET_SHARE`` of the slack the model
    has above the gate's floor (at most the strict gate's margin) and the mean cosine falls by at most
    ``MEAN_COSINE_SHARE`` of that (the mean cosine whatever the gate's metric: it is the smooth one);
    stops at the first op that fails. ``2 N + 1`` quantize-and-run trials for N candidate ops (~0.4 s
    each for face_det; face_mesh's 45 ops double its build to ~90 s; taking all 45 at once passes
    too, in one trial, but at min cosine 0.9990 on the evaluation split against the search's 0.9997).
    """
    from server.compression.litert_int8w import SEARCH_BUDGET_SHARE, _tighter, greedy  # noqa: PLC0415
    from server.compression.runners import LiteRtRunner, run_dataset  # noqa: PLC0415

    slack = -shortfall(base, gate)
    if slack <= 0:
        return (), base
    keep = min(shortfall(base, _tighter(gate)) - shortfall(base, gate), slack * SEARCH_BUDGET_SHARE)
    names = [scope for op, scope in _scopes(model) if op in PER_TENSOR_OPS and scope not in floats]
    trial = dst.with_name(dst.stem + ".per-tensor.tflite")
    measured: dict[tuple[str, ...], Fidelity] = {}

    def measure(scopes: Sequence[str]) -> tuple[float, bool]:
        _quantize(model, trial, ranges, floats, float_io, per_tensor=scopes)
        fid = measure_fidelity(reference, run_dataset(LiteRtRunner(trial), calibration), gate, calibration.labels)
        measured[tuple(scopes)] = fid
        drop = base.mean_cosine - fid.mean_cosine
        return fid.mean_cosine, shortfall(fid, gate) <= -keep and drop <= keep * MEAN_COSINE_SHARE

    try:
        _quantize(model, trial, ranges, floats, float_io)
        before = _ota(trial)
        chosen = tuple(greedy(base.mean_cosine, names, measure, lambda _: before - _ota(trial),
                              noise=MEAN_COSINE_NOISE, prefix=True))
    finally:
        for suffix in ("", ".int8-io", ".float-io"):
            trial.with_name(trial.stem + suffix + ".tflite").unlink(missing_ok=True)
    return chosen, measured.get(chosen, base)


def _ota(path: Path) -> int:
    """Bytes after the transfer codec's lzma (``codec.choose_codec``'s preset)."""
    return len(lzma.compress(path.read_bytes(), preset=6))


def channel_ranges(model: Path, data: Dataset, names: Collection[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named float tensors of ``model`` over ``data``."""
    out: dict[str, np.ndarray] = {}
    for interp, details in litert_tools.run_preserving_tensors(model, data):
        for d in details:
            if d["name"] not in names:
                continue
            value = np.abs(interp.get_tensor(d["index"]).reshape(-1, d["shape"][-1])).max(axis=0)
            out[d["name"]] = np.maximum(out.get(d["name"], value), value)
    return out


#: Bounds of an equalization factor (a channel is scaled by at most this, or its inverse).
MAX_EQUALIZE = 16.0


def equalize(src: Path, dst: Path, data: Dataset, power: float = 0.5) -> int:
    """Cross-layer equalization (Nagel et al. 2019) of each DEPTHWISE_CONV_2D -> CONV_2D pair with nothing
    between them: output channel c of the depthwise conv (weights and bias) times ``s_c``, input channel c of
    the conv's weights divided by it; the same function. ``s_c = w_c^(1 - power) / a_c^power`` (normalised
    to geometric mean 1, within MAX_EQUALIZE), ``a_c`` the channel's max |activation| over ``data``, ``w_c``
    the conv's max |weight| reading it: a few outlier channels (face_det: -141 where the rest stay within
    +-20) no longer set the scale of the whole int8 tensor. Expects fp32 constant weights
    (``fold_fp16_weights`` first). Returns how many pairs were equalized.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    graph = model.subgraphs[0]
    op = schema.BuiltinOperator

    def code(o: Any) -> int:
        return int(flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[o.opcodeIndex]))

    def const(index: int) -> np.ndarray | None:
        t = graph.tensors[index]
        data_ = model.buffers[t.buffer].data if 0 < t.buffer < len(model.buffers) else None
        if t.type != schema.TensorType.FLOAT32 or data_ is None or not len(data_):
            return None
        raw = bytes(np.asarray(data_, dtype=np.uint8))
        return np.frombuffer(raw, dtype="<f4").reshape([int(d) for d in t.shape]).astype(np.float64)

    def store(index: int, values: np.ndarray) -> None:
        t = graph.tensors[index]
        model.buffers[t.buffer].data = np.frombuffer(values.astype("<f4").tobytes(), dtype=np.uint8)

    readers: dict[int, list[Any]] = {}
    for o in graph.operators:
        for i in o.inputs:
            readers.setdefault(int(i), []).append(o)
    outputs = {int(i) for i in graph.outputs}
    pairs = []
    for o in graph.operators:
        if code(o) != op.DEPTHWISE_CONV_2D or len(o.inputs) < 3 or o.inputs[2] < 0 or o.builtinOptions is None \
                or o.builtinOptions.fusedActivationFunction != schema.ActivationFunctionType.NONE:
            continue
        out = int(o.outputs[0])
        nxt = readers.get(out, [])
        if out in outputs or len(nxt) != 1 or code(nxt[0]) != op.CONV_2D or int(nxt[0].inputs[0]) != out:
            continue
        dw_w, dw_b, conv_w = const(int(o.inputs[1])), const(int(o.inputs[2])), const(int(nxt[0].inputs[1]))
        if dw_w is None or dw_b is None or conv_w is None or dw_w.shape[-1] != conv_w.shape[-1]:
            continue
        pairs.append((o, nxt[0], dw_w, dw_b, conv_w))
    if not pairs:
        dst.write_bytes(src.read_bytes())
        return 0
    names = {}
    for o, *_ in pairs:
        name = graph.tensors[o.outputs[0]].name
        names[id(o)] = name.decode() if isinstance(name, bytes) else str(name)
    ranges = channel_ranges(src, data, set(names.values()))
    done = 0
    for o, conv, dw_w, dw_b, conv_w in pairs:
        act = ranges.get(names[id(o)])
        if act is None or act.shape[0] != dw_w.shape[-1]:
            continue
        wmax = np.abs(conv_w).reshape(-1, conv_w.shape[-1]).max(axis=0)
        ok = (act > 0) & (wmax > 0)
        s = np.ones_like(act, dtype=np.float64)
        s[ok] = wmax[ok] ** (1 - power) / act[ok] ** power
        s[ok] /= np.exp(np.log(s[ok]).mean())
        s = np.clip(s, 1 / MAX_EQUALIZE, MAX_EQUALIZE)
        store(int(o.inputs[1]), dw_w * s)
        store(int(o.inputs[2]), dw_b * s)
        store(int(conv.inputs[1]), conv_w / s)
        done += 1
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return done
