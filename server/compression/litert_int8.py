"""LiteRT full int8 (``litert-static-wi8-ai8``) that XNNPACK runs end to end, with measured float fallback.

Three things stand between LiteRT Quantizer's ``static_wi8_ai8`` and an int8 model faster than fp32:

* **Standalone activations.** XNNPACK leaves an int8 RELU to the builtin kernels; MediaPipe's face
  detector has 17 of them, which split its graph into 18 XNNPACK partitions (6x fp32's latency). They are
  fused into the op before them in the float graph first (``litert_graph.fuse_activations``: the same
  computation), so the quantizer quantizes the fused op and XNNPACK takes every op.
* **Ranges.** The quantizer's calibrator folds each sample's min/max into a moving average (weight 0.95
  on the past), which leaves the ranges near the typical sample's and clips the activations of the
  unusual ones; the gate judges the *worst* sample. Here each calibration sample is calibrated alone and
  the ranges are the min and max over all samples (``RANGES``: ``minmax``; ``ema`` is the quantizer's own).
* **Sensitive tails.** Where int8 everywhere still fails the gate on the calibration split, the last ops
  of the graph (detection heads, the concatenation of outputs with different ranges) are kept in float,
  more each round (``TAIL_FRACTIONS`` of the quantizable ops), until the model passes with
  ``litert_int8w.SEARCH_BUDGET_SHARE`` of the gate's budget; their weights are stored as fp16.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.compression import litert_graph, litert_tools
from server.compression.data import Dataset
from server.compression.gate import GateSpec, check_fidelity, measure_fidelity
from server.errors import ModelError

RANGES = ("minmax", "q99", "q95", "q90", "q75", "ema")
#: Share of the quantizable ops kept in float from the end of the graph, tried in this order.
TAIL_FRACTIONS = (0.0, 0.1, 0.2, 0.35)
#: Ops that carry no arithmetic of their own: not counted when sizing a float tail.
_NO_COMPUTE = {"RESHAPE", "QUANTIZE", "DEQUANTIZE"}


@dataclass(frozen=True)
class StaticInt8:
    """What ``static_int8`` made."""

    fused: int  # standalone activations fused into the op before them
    float_ops: tuple[str, ...]  # op scopes (output tensor names) kept in float
    fidelity: float | None  # the gate's metric on the calibration split (None without a gate)
    delegation: litert_graph.Delegation


def _quantizer() -> tuple[Any, Any, Any, Any]:
    try:
        from litert_quantizer import algorithm_manager, qtyping, recipe_manager  # noqa: PLC0415
        from litert_quantizer import quantizer as lq  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError("LiteRT Quantizer is not installed (pip install litert-quantizer)") from exc
    return lq, recipe_manager, algorithm_manager, qtyping


def _recipe(float_scopes: Sequence[str]) -> Any:
    _, recipe_manager, algorithm_manager, qtyping = _quantizer()
    rm = recipe_manager.RecipeManager()
    rm.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                         activation_num_bits=8, weight_num_bits=8)
    if float_scopes:  # an op's scope is its output tensor names, each followed by ";"
        regex = "^(" + "|".join(re.escape(s) for s in float_scopes) + ")$"
        rm.add_quantization_config(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
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
              float_io: bool) -> None:
    lq, *_ = _quantizer()
    q = lq.Quantizer(str(model))
    q.load_quantization_recipe(_recipe(float_scopes))
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
    else:
        dst.write_bytes(staged.read_bytes())


def static_int8(src: Path, dst: Path, calibration: Dataset, *, gate: GateSpec | None = None,
                float_io: bool = True, ranges: str = "minmax",
                fractions: Sequence[float] = TAIL_FRACTIONS) -> StaticInt8:
    """Full int8 of ``src`` into ``dst`` (see the module doc); with ``gate``, the smallest float tail that
    passes it on ``calibration`` with SEARCH_BUDGET_SHARE of its budget, else the most faithful tried.
    Intermediate files go next to ``dst`` and are removed."""
    staged = [dst.with_name(dst.stem + suffix) for suffix in (".fused.tflite", ".fp32.tflite", ".signed.tflite",
                                                              ".trial.tflite")]
    try:
        return _static_int8(src, dst, staged, calibration, gate=gate, float_io=float_io, ranges=ranges,
                            fractions=fractions)
    finally:
        for path in [*staged, *(p.with_name(p.stem + s) for p in (dst, staged[3])
                                for s in (".int8-io.tflite", ".float-io.tflite"))]:
            path.unlink(missing_ok=True)


def _static_int8(src: Path, dst: Path, staged: list[Path], calibration: Dataset, *, gate: GateSpec | None,
                 float_io: bool, ranges: str, fractions: Sequence[float]) -> StaticInt8:
    from server.compression.litert_int8w import _tighter  # noqa: PLC0415
    from server.compression.runners import LiteRtRunner, run_dataset  # noqa: PLC0415

    fused_path, folded, signed, trial = staged
    fused = litert_graph.fuse_activations(src, fused_path)
    litert_tools.fold_fp16_weights(fused_path, folded)
    litert_tools.with_default_signature(folded, signed)
    ranges_result = calibrate(signed, calibration, ranges)
    if gate is None:
        _quantize(signed, dst, ranges_result, (), float_io)
        return StaticInt8(fused, (), None, litert_graph.delegation(dst))
    scopes = _scopes(signed)
    strict = _tighter(gate)
    reference = run_dataset(LiteRtRunner(src), calibration)
    best: tuple[float, tuple[str, ...]] | None = None
    tried: set[tuple[str, ...]] = set()
    for fraction in fractions:
        floats = tail(scopes, fraction)
        if floats in tried:
            continue
        tried.add(floats)
        _quantize(signed, trial, ranges_result, floats, float_io)
        fid = measure_fidelity(reference, run_dataset(LiteRtRunner(trial), calibration), strict,
                               calibration.labels)
        passed = check_fidelity(fid, strict) is None
        if passed or best is None or fid.value > best[0]:
            best = (fid.value, floats)
            trial.replace(dst)
        if passed:
            break
    if best is None:
        raise ModelError("no float-tail fraction to try")
    return StaticInt8(fused, best[1], best[0], litert_graph.delegation(dst))
