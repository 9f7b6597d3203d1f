"""ONNX steps of the pipeline: load and check, fit the opset to a profile, pre-process, and each recipe.

All functions take and write file paths (the quantizers work on files) and raise ``ModelError`` /
``UnsupportedOpError`` at the seam. ORT's quantizers log through ``logging``; nothing here prints.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from agent.protocol.messages import TensorSpec
from server.compression.data import Dataset
from server.errors import ModelError, UnsupportedOpError

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 2 << 30  # protobuf's limit; larger models need external data, which we do not take
_ELEM: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}
#: Lowest onnxruntime release that loads each ai.onnx opset (ONNX Runtime compatibility table).
ORT_FOR_OPSET = {
    10: "1.0", 11: "1.3", 12: "1.6", 13: "1.7", 14: "1.8", 15: "1.10", 16: "1.11", 17: "1.12", 18: "1.14",
    19: "1.15", 20: "1.17", 21: "1.18", 22: "1.20", 23: "1.22",
}
#: Ops with weights the quantizers turn into integer kernels.
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")


def load(path: Path) -> onnx.ModelProto:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror}") from exc
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"model {path} is {size} bytes; the limit is {MAX_MODEL_BYTES}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... with no common base
        raise ModelError(f"{path.name} is not a valid ONNX model: {exc}") from exc
    if not model.graph.node:
        raise ModelError(f"{path.name} has an empty graph")
    return model


def save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def min_ort_version(op_set: int) -> str:
    return ORT_FOR_OPSET.get(op_set, "1.0" if op_set < 10 else max(ORT_FOR_OPSET.values(), key=_vt))


def _vt(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _shape(t: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = t.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)


def io_specs(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inits = {i.name for i in model.graph.initializer}

    def spec(t: onnx.ValueInfoProto) -> TensorSpec:
        elem = t.type.tensor_type.elem_type
        if elem not in _ELEM:
            raise ModelError(f"tensor {t.name!r} has an element type ({elem}) the agent cannot feed")
        return TensorSpec(t.name, _ELEM[elem], _shape(t))

    ins = tuple(spec(t) for t in model.graph.input if t.name not in inits)
    outs = tuple(spec(t) for t in model.graph.output)
    return ins, outs


def op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def domain_ops(model: onnx.ModelProto) -> frozenset[tuple[str, str]]:
    """(domain, op type) of every node, in the order-free form ``check_op_types`` takes."""
    return frozenset((node.domain, node.op_type) for node in model.graph.node)


def check_ops(model: onnx.ModelProto, max_opset: int, profile: str, runtime: str) -> None:
    """Every ai.onnx op must exist at the profile's highest opset; UnsupportedOpError names the first that does not."""
    check_op_types([(node.domain, node.op_type) for node in model.graph.node], max_opset, profile, runtime)


def check_op_types(ops: Iterable[tuple[str, str]], max_opset: int, profile: str, runtime: str) -> None:
    for domain, op_type in ops:
        if domain not in ("", "ai.onnx"):
            if domain == "com.microsoft":
                continue  # ORT contrib ops: present in every ORT build the profiles list
            raise UnsupportedOpError(
                f"op {op_type} (domain {domain}) is not available in {runtime} on profile {profile}",
                op=op_type, profile=profile,
            )
        try:
            onnx.defs.get_schema(op_type, max_opset, "")
        except onnx.defs.SchemaError:
            raise UnsupportedOpError(
                f"op {op_type} does not exist at opset {max_opset}, the highest {runtime} on profile "
                f"{profile} accepts",
                op=op_type, profile=profile,
            ) from None


def fit_opset(model: onnx.ModelProto, max_opset: int, profile: str, runtime: str) -> onnx.ModelProto:
    """The model at an opset the profile's runtime loads (converted down when needed), ops checked."""
    current = opset(model)
    check_ops(model, max_opset, profile, runtime)  # an op newer than the runtime: name it before converting
    if current > max_opset:
        try:
            model = onnx.version_converter.convert_version(model, max_opset)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise UnsupportedOpError(
                f"model uses opset {current}; profile {profile} ({runtime}) accepts at most {max_opset} and "
                f"the conversion failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                profile=profile,
            ) from exc
    check_ops(model, max_opset, profile, runtime)
    return model


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """chdir for the duration (contextlib.chdir is Python 3.11+); the build commands are single-threaded."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def preprocess(src: Path, dst: Path) -> list[str]:
    """ORT's quant_pre_process (optimize + ONNX and symbolic shape inference), with fallbacks.

    Symbolic shape inference fails on some exported graphs (torch-exported MiniLM); then it is skipped,
    then all optimization is skipped; as a last resort the model is copied unchanged. Returns the notes.
    """
    from onnxruntime.quantization import quant_pre_process  # noqa: PLC0415

    attempts: list[tuple[str, dict[str, bool]]] = [
        ("full", {}),
        ("skip_symbolic_shape", {"skip_symbolic_shape": True}),
        ("skip_symbolic_shape+skip_optimization", {"skip_symbolic_shape": True, "skip_optimization": True}),
    ]
    notes: list[str] = []
    for name, kwargs in attempts:
        try:
            with _cwd(dst.parent):  # a failing symbolic shape inference dumps its model (+ data) into the cwd
                quant_pre_process(str(src.resolve()), str(dst.resolve()), **kwargs)
            onnx.checker.check_model(str(dst))
        except Exception as exc:  # noqa: BLE001 - the pre-processor raises anything; each failure has a fallback
            notes.append(f"quant_pre_process {name} failed: {type(exc).__name__}: {str(exc)[:160]}")
            log.info("pre-processing %s failed (%s), falling back", name, exc)
            continue
        notes.append(f"quant_pre_process: {name}")
        folded = fold_conv_scalar_affine(dst)
        if folded:
            notes.append(f"{folded} scalar Mul/Add after a Conv folded into its weights and bias")
        fused = fuse_hardswish(dst)
        if fused:
            notes.append(f"{fused} hardswish (Add, Clip, Mul, Div) rewritten as x * HardSigmoid(x)")
        return notes
    dst.write_bytes(src.read_bytes())
    notes.append("pre-processing skipped (all attempts failed)")
    return notes


def _scalar(inits: dict[str, onnx.TensorProto], name: str, rank: int) -> float | None:
    t = inits.get(name)
    if t is None or t.data_type != onnx.TensorProto.FLOAT or len(t.dims) > rank:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _sole_consumer(g: onnx.GraphProto) -> Callable[[str, str], onnx.NodeProto | None]:
    """``f(name, op)``: the one node reading tensor ``name`` when it is an ``op`` and ``name`` is not a
    graph output, else None."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def sole(name: str, op: str) -> onnx.NodeProto | None:
        cs = consumers.get(name, [])
        return cs[0] if len(cs) == 1 and cs[0].op_type == op and name not in outputs else None

    return sole


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    """Remove the initializers no node reads (a graph without subgraphs; graph inputs are kept)."""
    used = {i for n in g.node for i in n.input} | {i.name for i in g.input}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)


def _flat_graph(path: Path) -> tuple[onnx.ModelProto, onnx.GraphProto, dict[str, onnx.TensorProto]] | None:
    """The model at ``path``, its graph and initializers by name; None when the graph has If/Loop bodies (their
    outer-scope names make a rewrite unsafe: such graphs are left alone)."""
    model = load(path)
    g = model.graph
    if any(True for _ in _subgraphs(g)):
        return None
    return model, g, {t.name: t for t in g.initializer}


def fold_conv_scalar_affine(path: Path) -> int:
    """Fold ``Conv -> Mul(c) [-> Add(d)]`` with scalar constants ``c``, ``d`` into the Conv (weights * c,
    bias * c + d), in place; exact in float. PP-OCRv4's LCNetV3 ends 28 convolutions with such a
    learnable affine; ORT's Conv+Mul/Add fusions leave it (constants of shape [1]). Quantized, each is
    two more requantized element-wise ops; folded, the int8 fallback runs 0.69x fp32 instead of 0.73x
    (docs/benchmarks.md). Returns how many were folded."""
    flat = _flat_graph(path)
    if flat is None:
        return 0
    model, g, inits = flat
    only_consumer = _sole_consumer(g)

    folded = 0
    for conv in list(g.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[conv.input[1]])
        mul = only_consumer(conv.output[0], "Mul")
        others = [i for i in mul.input if i != conv.output[0]] if mul is not None else []
        scale = _scalar(inits, others[0], w.ndim) if len(others) == 1 else None
        if mul is None or scale is None or w.dtype != np.float32:
            continue
        add = only_consumer(mul.output[0], "Add")
        addend = [i for i in add.input if i != mul.output[0]] if add is not None else []
        shift = _scalar(inits, addend[0], w.ndim) if len(addend) == 1 else None
        if shift is None:
            add, shift = None, 0.0
        has_bias = len(conv.input) > 2 and conv.input[2] in inits
        if len(conv.input) > 2 and conv.input[2] and not has_bias:
            continue
        bias = numpy_helper.to_array(inits[conv.input[2]]) if has_bias else np.zeros(w.shape[0], np.float32)
        tag = f"{conv.output[0]}_affine"
        g.initializer.extend([numpy_helper.from_array((w * scale).astype(np.float32), f"{tag}_w"),
                              numpy_helper.from_array((bias * scale + shift).astype(np.float32), f"{tag}_b")])
        del conv.input[1:]
        conv.input.extend([f"{tag}_w", f"{tag}_b"])
        conv.output[0] = (add if add is not None else mul).output[0]
        for n in (mul, add):
            if n is not None:
                n.op_type = "_folded"  # dropped below
        folded += 1
    if not folded:
        return 0
    keep = [n for n in g.node if n.op_type != "_folded"]
    del g.node[:]
    g.node.extend(keep)
    _drop_unused_initializers(g)
    save(model, path)
    return folded


def fuse_hardswish(path: Path) -> int:
    """Rewrite the exported hardswish ``x * Clip(x + 3, 0, 6) / 6`` (Add, Clip, Mul, Div) as
    ``x * HardSigmoid(x, 1/6, 1/2)``, in place: equal up to float rounding, two element-wise ops instead
    of four. Paddle exports LCNetV3's 24 hardswish so; kept in float by the int8 fallback, they were a
    tenth of its time (PP-OCRv4 det 0.60x fp32 instead of 0.68x, docs/benchmarks.md). Returns how many."""
    flat = _flat_graph(path)
    if flat is None:
        return 0
    model, g, inits = flat
    next_node = _sole_consumer(g)

    def value(name: str) -> float | None:
        return _scalar(inits, name, 4)

    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for add in g.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        consts = [value(i) for i in add.input]
        if 3.0 not in consts:
            continue
        x = add.input[consts.index(3.0) ^ 1]
        clip = next_node(add.output[0], "Clip")
        bounds = [value(i) for i in clip.input[1:]] if clip is not None else []
        if clip is None or bounds != [0.0, 6.0]:
            continue
        mul = next_node(clip.output[0], "Mul")
        div = next_node(mul.output[0], "Div") if mul is not None and x in mul.input else None
        if mul is None or div is None or div.input[0] != mul.output[0] or value(div.input[1]) != 6.0:
            continue
        gate = f"{add.output[0]}_hardsigmoid"
        replaced[id(add)] = [
            onnx.helper.make_node("HardSigmoid", [x], [gate], name=gate, alpha=1.0 / 6.0, beta=0.5),
            onnx.helper.make_node("Mul", [x, gate], [div.output[0]], name=f"{div.name}_hardswish"),
        ]
        dropped |= {id(clip), id(mul), id(div)}
    if not replaced:
        return 0
    nodes = [m for n in g.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    _drop_unused_initializers(g)  # the 3 and 6 constants
    save(model, path)
    return len(replaced)


#: Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist from opset 13.
PER_CHANNEL_OPSET = 13


def raise_opset_for_quantization(path: Path, max_opset: int) -> list[str]:
    """Convert the quantizers' input up to opset 13 when it is older and the profile allows it (in place)."""
    model = onnx.load(str(path))
    current = opset(model)
    if current >= PER_CHANNEL_OPSET or max_opset < PER_CHANNEL_OPSET:
        return []
    try:
        converted = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - then the quantizers work on the original opset
        return [f"opset {current} -> {PER_CHANNEL_OPSET} for per-channel quantization failed: {type(exc).__name__}"]
    save(converted, path)
    return [f"quantizer input converted from opset {current} to {PER_CHANNEL_OPSET} (per-channel Q/DQ need it)"]


def optimize_fp32(src: Path, dst: Path) -> None:
    """ORT's offline graph optimizations at the basic level (ONNX-standard ops only, portable)."""
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"graph optimization failed: {exc}") from exc


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations, fp32 inputs and outputs (keep_io_types)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    toposort(half.graph)  # the converter appends the input Casts after their consumers
    save(half, dst)


#: Float initializers smaller than this stay fp32 (shapes, scales: the Cast would cost more than it saves).
FP16_MIN_ELEMENTS = 256
FP16_MAX = 65504.0


def fold_constants(graph: onnx.GraphProto) -> int:
    """Turn Constant nodes holding a tensor into initializers (Paddle exports keep weights there); count."""
    keep, folded = [], 0
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and len(node.output) == 1 and node.domain in ("", "ai.onnx"):
            init = onnx.TensorProto()
            init.CopyFrom(value)
            init.name = node.output[0]
            graph.initializer.append(init)
            folded += 1
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _fp16_graph(graph: onnx.GraphProto) -> int:
    """fp16 initializers + Casts in ``graph`` and, recursively, in its If/Loop/Scan bodies."""
    converted = sum(_fp16_graph(sub) for sub in _subgraphs(graph))
    fold_constants(graph)
    inputs = {i.name for i in graph.input}
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in inputs:
            continue  # an initializer listed as a graph input may be overridden by a feed: keep its type
        w = numpy_helper.to_array(init)
        if w.size < FP16_MIN_ELEMENTS or not np.isfinite(w).all() or float(np.abs(w).max()) > FP16_MAX:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float16), f"{name}__fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}__fp16"], [name], name=f"{name}__to_fp32",
                                           to=onnx.TensorProto.FLOAT))
        converted += 1
    if casts:
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(casts + nodes)
    return converted


def fp16_weights(src: Path, dst: Path) -> int:
    """Store float weights as fp16 initializers, each restored by a Cast to fp32; returns how many.

    The graph computes in fp32 as before: ONNX Runtime folds a Cast of an initializer at session
    creation (constant folding), so the running model holds fp32 weights and runs at fp32 speed;
    only the file (the download) is halved. Constant nodes are folded into initializers first;
    integer tensors, tensors with values beyond the fp16 range, and tiny ones are left alone.
    Subgraphs (If/Loop/Scan bodies, where recurrent exports keep their weights) are included.
    """
    model = onnx.load(str(src))
    converted = _fp16_graph(model.graph)
    save(model, dst)
    return converted


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            ordered.extend(rest)  # a cycle or a missing input: leave it for the checker to report
            break
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for dst_node, src_node in zip(copies, ordered, strict=True):
        dst_node.CopyFrom(src_node)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_dynamic(
    src: Path,
    dst: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    signed_weights: bool = True,
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8 if signed_weights else QuantType.QUInt8,
        op_types_to_quantize=list(op_types) if op_types else None,
        nodes_to_exclude=list(exclude),
        extra_options={"MatMulConstBOnly": True},
    )


def quantize_weight_only(
    src: Path, dst: Path, *, block_size: int, accuracy_level: int, exclude: Sequence[str] = ()
) -> None:
    """8-bit blockwise MatMul weights (com.microsoft.MatMulNBits), then int8 embedding tables (Gather)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb  # noqa: PLC0415

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = mnb.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=8
    )
    quantizer = mnb.MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        nodes_to_exclude=list(exclude), algo_config=config,
    )
    quantizer.process()
    mid = dst.with_name(dst.stem + ".nbits.onnx")
    quantizer.model.save_model_to_file(str(mid), use_external_data_format=False)
    model = onnx.load(str(mid))
    inits = {i.name for i in model.graph.initializer}
    if any(n.op_type == "Gather" and n.input and n.input[0] in inits for n in model.graph.node):
        quantize_dynamic(mid, dst, per_channel=True, reduce_range=False, op_types=["Gather"], exclude=exclude)
        mid.unlink()
    else:
        mid.replace(dst)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a Dataset, one sample (or fixed batch) per call."""

    def __init__(self, data: Dataset, batch: int) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = data.batches(batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by the calibrators we call
        pass


def quantize_static(
    src: Path,
    dst: Path,
    data: Dataset,
    *,
    method: str,
    signed_activations: bool,
    reduce_range: bool,
    per_channel: bool = True,
    batch: int = 1,
    exclude: Sequence[str] = (),
    cache: Path | None = None,
) -> None:
    """Static QDQ. ``cache``: ORT's calibration cache (JSON tensor ranges), written by the first call and
    read by later ones with the same model, data and method: activation types, reduce_range and node
    exclusions only change how the ranges are used, so those candidates skip the calibration runs."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as _quantize_static  # noqa: PLC0415

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    reader = _Reader(data, batch)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

    extra: dict[str, Any] = {"CalibMovingAverage": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress to stdout
        _quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=list(exclude),
            extra_options=extra,
            calibration_cache_path=str(cache) if cache is not None else None,
        )
    strip_value_info(dst)


def strip_value_info(path: Path) -> None:
    """Drop the intermediate shape annotations the pre-processing left in: ORT infers them at load, and on a
    small model they are a measurable part of the download (digits int8: 406 of 44,946 bytes)."""
    model = load(path)
    if len(model.graph.value_info):
        del model.graph.value_info[:]
        save(model, path)


def prune(src: Path, dst: Path, sparsity: float) -> int:
    """Zero the smallest-magnitude ``sparsity`` of every Conv/MatMul/Gemm weight; returns weights zeroed.

    Unstructured zeros do not make dense kernels faster: this only shrinks the compressed download.
    """
    model = onnx.load(str(src))
    weighted = {n.input[1] for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1}
    # weights live in initializers, or in Constant nodes (Paddle exports such as PP-OCR)
    tensors = [init for init in model.graph.initializer if init.name in weighted]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" and n.output and n.output[0] in weighted
                for a in n.attribute if a.name == "value"]
    zeroed = 0
    for tensor in tensors:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(tensor).copy()
        if w.size < 256:
            continue
        k = int(w.size * sparsity)
        if k == 0:
            continue
        cut = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        mask = np.abs(w) <= cut
        zeroed += int(mask.sum())
        w[mask] = 0.0
        tensor.CopyFrom(numpy_helper.from_array(w.astype(np.float32), tensor.name))
    save(model, dst)
    return zeroed


def _touched(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto) -> set[str]:
    """The nodes the quantizer touched: QDQ nodes fed by a DequantizeLinear, or float nodes it replaced."""
    dq_outputs = {o for n in qmodel.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_names = {n.name for n in qmodel.graph.node}
    touched = {n.name for n in qmodel.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
               and any(i in dq_outputs for i in n.input)}
    touched |= {n.name for n in fmodel.graph.node if n.name and n.name not in q_names}
    return touched


def front_nodes(float_path: Path, quant_path: Path) -> list[str]:
    """The quantized nodes in the order a static int8 fallback keeps them in float: every element-wise
    node first (activations, affine Mul/Add, pooling: little compute, but each re-quantizes its output),
    then the weighted ops (``WEIGHTED_OPS``) first layers first. A CNN's early layers see the widest
    activation ranges and their error is amplified by every layer after them. On PP-OCRv4 det (gate IoU
    0.97): all-ops int8 0.944; element-wise ops float 0.953 and faster than all-ops (0.77x fp32 vs 0.82x);
    plus the first 4 of 64 convolutions float 0.973 at 0.73x, where the earlier order (the first 99 nodes
    of the graph, convolutions and element-wise alike) passed at 0.79-0.83x. ``fallback_cuts`` sizes the
    steps."""
    fmodel, qmodel = onnx.load(str(float_path)), onnx.load(str(quant_path))
    touched = _touched(fmodel, qmodel)
    nodes = [n for n in fmodel.graph.node if n.name and n.name in touched]
    return ([n.name for n in nodes if n.op_type not in WEIGHTED_OPS]
            + [n.name for n in nodes if n.op_type in WEIGHTED_OPS])


def fallback_cuts(float_path: Path, ranked: Sequence[str], shares: Sequence[float]) -> list[int]:
    """How many of ``ranked`` each fallback step keeps in float, growing, each below ``len(ranked)``.

    A ranking that starts with element-wise nodes (``front_nodes``) keeps all of them in every step
    and a share of the weighted ops after them; any other ranking (``matmul_sensitivity``), a share
    of the whole list."""
    ops = {n.name: n.op_type for n in load(float_path).graph.node}
    cheap = next((i for i, name in enumerate(ranked) if ops.get(name) in WEIGHTED_OPS), len(ranked))
    cuts: list[int] = []
    for share in shares:
        k = max(cuts[-1] + 1 if cuts else 1, cheap + math.ceil((len(ranked) - cheap) * share))
        if k >= len(ranked):  # keeping every quantized node in float is just fp32
            break
        cuts.append(k)
    return cuts


def _fake_quant_weight(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel (last axis) weight quantization, as quantize_dynamic does per-channel."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    out: np.ndarray = np.clip(np.round(w / scale), -qmax, qmax) * scale
    return out


def _fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8, range including 0 (DynamicQuantizeLinear)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    out: np.ndarray = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    return out


def matmul_sensitivity(float_path: Path, data: Dataset, *, weight_bits: int, batch: int = 32) -> list[str]:
    """MatMul/Gemm nodes with constant weights, most sensitive first, for dynamic int8.

    Each node's error is simulated alone on the float model's own activations: relative L2 error of
    Q(x) @ Q(W) against x @ W. Unlike errors read off the fully quantized model, this is not drowned by
    what upstream nodes already got wrong (on MiniLM it finds in 6 nodes what that needs 24+ for).
    """
    from server.compression.runners import OrtRunner  # noqa: PLC0415

    model = onnx.load(str(float_path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node
             if n.op_type in ("MatMul", "Gemm") and n.name and len(n.input) > 1 and n.input[1] in inits]
    if not nodes:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in model.graph.output}
    for x in sorted({n.input[0] for n in nodes} - existing):
        probe.graph.output.append(onnx.ValueInfoProto(name=x))
    work = Path(tempfile.mkdtemp(dir=float_path.parent, prefix=".sens-"))
    try:
        save(probe, work / "probe.onnx")
        runner = OrtRunner(work / "probe.onnx")
        names = [o.name for o in runner.outputs]
        weights = {}
        for n in nodes:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0) if n.op_type == "Gemm" else 0
            w = w.T if trans_b else w
            weights[n.name] = (w, _fake_quant_weight(w, weight_bits))
        err = {n.name: [0.0, 0.0] for n in nodes}
        for feeds in data.take(16).batches(batch):
            acts = dict(zip(names, runner.run(feeds), strict=True))
            for n in nodes:
                x = acts.get(n.input[0])
                if x is None or x.dtype.kind != "f" or not np.isfinite(x).all():
                    continue
                x64 = x.astype(np.float64)
                w, wq = weights[n.name]
                y = x64 @ w
                err[n.name][0] += float(np.square(y - _fake_quant_activation(x64) @ wq).sum())
                err[n.name][1] += float(np.square(y).sum())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(err, key=lambda k: -(err[k][0] / (err[k][1] or 1.0)))

