"""LiteRT (.tflite) steps: read the model, and the LiteRT Quantizer recipes (``litert-quantizer``).

Recipes: ``dynamic_wi8_afp32`` (int8 weights, float activations: the old Optimize.DEFAULT) and
``static_wi8_ai8`` (full int8 with calibration: what the Edge TPU needs). fp16 weights (DEQUANTIZE
on fp16 constants) are folded to fp32 first, and a model without a signature gets a default one, so
the quantizer has weights to quantize and a signature to calibrate through. The quantizer is an
optional dependency of the server; without it .tflite models get fp32 only, and the build says so.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.messages import TensorSpec
from server.compression.data import Dataset
from server.errors import ModelError

log = logging.getLogger(__name__)

TFLITE_MAGIC = b"TFL3"
MAX_MODEL_BYTES = 2 << 30


def quantizer_version() -> str | None:
    for dist in ("litert-quantizer", "ai-edge-quantizer"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def litert_version() -> str:
    try:
        return importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def check(path: Path) -> bytes:
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_MODEL_BYTES else b""
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror}") from exc
    if not data:
        raise ModelError(f"model {path} is empty or over {MAX_MODEL_BYTES} bytes")
    if data[4:8] != TFLITE_MAGIC:
        raise ModelError(f"{path.name} is not a LiteRT flatbuffer (no TFL3 identifier)")
    return data


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from server.compression.runners import LiteRtRunner  # noqa: PLC0415

    runner = LiteRtRunner(path)
    return runner.inputs, runner.outputs


def with_default_signature(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` adding a ``serving_default`` signature over subgraph 0 when it has none.

    Older converters (MediaPipe's models) wrote no SignatureDefs; LiteRT Quantizer calibrates through
    signature runners. The graph itself is unchanged. Returns whether a signature was added.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    if model.signatureDefs:
        dst.write_bytes(src.read_bytes())
        return False
    graph = model.subgraphs[0]

    def tensor_map(index: int) -> Any:
        name = graph.tensors[index].name
        return schema.TensorMapT(name=name.decode() if isinstance(name, bytes) else name, tensorIndex=index)

    model.signatureDefs = [
        schema.SignatureDefT(
            inputs=[tensor_map(int(i)) for i in graph.inputs],
            outputs=[tensor_map(int(i)) for i in graph.outputs],
            signatureKey="serving_default",
            subgraphIndex=0,
        )
    ]
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return True


def fold_fp16_weights(src: Path, dst: Path) -> int:
    """Replace DEQUANTIZE ops on constant fp16 tensors by fp32 constants; returns how many were folded.

    Models shipped with fp16 weights (MediaPipe's) feed every Conv through a DEQUANTIZE; LiteRT
    Quantizer then sees no constant weights or biases and leaves the model as it is (dynamic) or
    fails (static). Folding gives it fp32 constants to quantize; the graph computes the same values.
    The fp16 tensors, used by no op any more, are removed with their buffers (else the quantized
    file would still carry every fp16 weight).
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    folded = 0
    for index, graph in enumerate(model.subgraphs):
        keep = []
        for op in graph.operators:
            code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            if code == schema.BuiltinOperator.DEQUANTIZE and len(op.inputs) == 1 and len(op.outputs) == 1:
                t_in, t_out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
                data = model.buffers[t_in.buffer].data if t_in.buffer < len(model.buffers) else None
                if t_in.type == schema.TensorType.FLOAT16 and data is not None and len(data):
                    values = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype="<f2").astype("<f4")
                    buf = schema.BufferT()
                    buf.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
                    model.buffers.append(buf)
                    t_out.buffer = len(model.buffers) - 1
                    folded += 1
                    continue
            keep.append(op)
        graph.operators = keep
        _drop_unused_tensors(model, index)
    _drop_unused_buffers(model)
    fix_operator_codes(model)
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return folded


def fix_operator_codes(model: Any) -> int:
    """Fill ``builtinCode`` from ``deprecatedBuiltinCode`` in older flatbuffers; returns how many were fixed.

    Converters before TF 2.4 (MediaPipe's face models) set only the deprecated 8-bit field, leaving
    ``builtinCode`` 0 (ADD). LiteRT reads the larger of the two, but LiteRT Quantizer reads
    ``builtinCode``: it then took every op for an ADD and quantized conv weights like activations
    (per-tensor, asymmetric), which LiteRT refuses (conv.cc: zero_point != 0).
    """
    fixed = 0
    for code in model.operatorCodes:
        if code.builtinCode < code.deprecatedBuiltinCode:
            code.builtinCode = code.deprecatedBuiltinCode
            fixed += 1
    return fixed


def _drop_unused_tensors(model: Any, index: int) -> None:
    """Remove the tensors of subgraph ``index`` that no op, graph input/output or signature names."""
    graph = model.subgraphs[index]
    used = {int(i) for op in graph.operators for i in [*op.inputs, *op.outputs] if i >= 0}
    used |= {int(i) for i in graph.inputs} | {int(i) for i in graph.outputs}
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == index:
            used |= {m.tensorIndex for m in [*sig.inputs, *sig.outputs]}
    new = {old: i for i, old in enumerate(sorted(used))}
    if len(new) == len(graph.tensors):
        return
    graph.tensors = [graph.tensors[old] for old in sorted(used)]

    def remap(seq: Any) -> list[int]:
        return [new[int(i)] if i >= 0 else int(i) for i in seq]

    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == index:
            for m in [*sig.inputs, *sig.outputs]:
                m.tensorIndex = new[m.tensorIndex]


def _drop_unused_buffers(model: Any) -> None:
    """Empty the buffers no tensor points at (indices stay: metadata may name buffers too)."""
    used = {t.buffer for g in model.subgraphs for t in g.tensors}
    used |= {m.buffer for m in model.metadata or []}
    for i, buf in enumerate(model.buffers):
        if i not in used and buf.data is not None and len(buf.data):
            buf.data = None


#: Ops whose float constant inputs (weights, biases) are stored as fp16 by ``fp16_weights``.
FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CUSTOM")
#: Smaller constants stay fp32: the DEQUANTIZE op would cost more than the bytes saved.
FP16_MIN_ELEMENTS = 16
FP16_MAX = 65504.0
#: DEQUANTIZE from float16 is version 3 of the op (LiteRT op versioning).
DEQUANTIZE_FP16_VERSION = 3


def stores_fp16_weights(path: Path) -> bool:
    """Whether the model already keeps its weights as fp16 constants behind DEQUANTIZE ops (MediaPipe's)."""
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    for graph in model.subgraphs:
        for op in graph.operators:
            code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            if code == schema.BuiltinOperator.DEQUANTIZE and len(op.inputs) == 1:
                t = graph.tensors[op.inputs[0]]
                data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
                if t.type == schema.TensorType.FLOAT16 and data is not None and len(data):
                    return True
    return False


def fp16_weights(src: Path, dst: Path) -> int:
    """Store the float weights and biases of conv/FC ops as fp16 constants, each behind a DEQUANTIZE op.

    The layout MediaPipe ships: half the bytes, computed in fp32 (XNNPACK folds the DEQUANTIZE into
    static fp32 weights at load; the builtin kernels run the DEQUANTIZE once). Constants beyond the
    fp16 range, or smaller than FP16_MIN_ELEMENTS, stay fp32. Returns how many tensors were converted.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    fix_operator_codes(model)
    wanted = {getattr(schema.BuiltinOperator, name) for name in FP16_WEIGHT_OPS}
    dq_index = next((i for i, c in enumerate(model.operatorCodes)
                     if flatbuffer_utils.get_builtin_code_from_operator_code(c) == schema.BuiltinOperator.DEQUANTIZE
                     and c.version >= DEQUANTIZE_FP16_VERSION), None)
    converted = 0
    for graph in model.subgraphs:
        done: set[int] = set()
        dequantize = []
        for op in graph.operators:
            code = flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
            if code not in wanted:
                continue
            for index in (int(i) for i in op.inputs[1:] if i >= 0):
                t = graph.tensors[index]
                data = model.buffers[t.buffer].data if 0 < t.buffer < len(model.buffers) else None
                quantized = t.quantization is not None and t.quantization.scale is not None \
                    and len(t.quantization.scale) > 0
                if index in done or t.type != schema.TensorType.FLOAT32 or data is None or quantized:
                    continue
                values = np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype="<f4")
                if values.size < FP16_MIN_ELEMENTS or not np.isfinite(values).all() or \
                        float(np.abs(values).max()) > FP16_MAX:
                    continue
                if dq_index is None:
                    code_t = schema.OperatorCodeT()
                    code_t.builtinCode = code_t.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
                    code_t.version = DEQUANTIZE_FP16_VERSION
                    model.operatorCodes.append(code_t)
                    dq_index = len(model.operatorCodes) - 1
                half = schema.TensorT()
                half.shape, half.type = t.shape, schema.TensorType.FLOAT16
                half.name = (t.name if isinstance(t.name, bytes) else str(t.name).encode()) + b"_fp16"
                half.buffer = t.buffer  # the buffer now holds the fp16 values; the fp32 tensor becomes the op output
                model.buffers[t.buffer].data = np.frombuffer(values.astype("<f2").tobytes(), dtype=np.uint8)
                t.buffer = 0
                graph.tensors.append(half)
                op_t = schema.OperatorT()
                op_t.opcodeIndex = dq_index
                op_t.inputs, op_t.outputs = [len(graph.tensors) - 1], [index]
                dequantize.append(op_t)
                done.add(index)
                converted += 1
        graph.operators = dequantize + list(graph.operators)
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return converted


def _signature(path: Path) -> tuple[str, dict[str, str]]:
    """The signature key the quantizer calibrates, and its argument name for each input tensor name."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interp = Interpreter(model_path=str(path))
    sigs = interp.get_signature_list()
    if not sigs:
        raise ModelError(f"{path.name} has no signature; LiteRT Quantizer calibration needs one")
    key = next(iter(sigs))
    runner = interp.get_signature_runner(key)
    return key, {d["name"]: arg for arg, d in runner.get_input_details().items()}


def quantize(src: Path, dst: Path, recipe: str, calibration: Dataset | None = None) -> None:
    """Apply a LiteRT Quantizer recipe (``dynamic_wi8_afp32`` or ``static_wi8_ai8``)."""
    try:
        from litert_quantizer import quantizer as lq  # noqa: PLC0415
        from litert_quantizer import recipe as lq_recipe  # noqa: PLC0415
    except ImportError:
        try:
            from ai_edge_quantizer import quantizer as lq  # noqa: PLC0415
            from ai_edge_quantizer import recipe as lq_recipe  # noqa: PLC0415
        except ImportError as exc:
            raise ModelError("LiteRT Quantizer is not installed (pip install litert-quantizer)") from exc
    unfolded = dst.with_name(dst.stem + ".fp32.tflite")
    fold_fp16_weights(src, unfolded)  # also fills operator codes the quantizer reads
    src = unfolded
    if calibration is not None:
        signed = dst.with_name(dst.stem + ".signed.tflite")
        with_default_signature(src, signed)
        src = signed
    q: Any = lq.Quantizer(str(src))
    q.load_quantization_recipe(getattr(lq_recipe, recipe)())
    calib_result = None
    if q.need_calibration:
        if calibration is None:
            raise ModelError(f"recipe {recipe} needs calibration data")
        key, args = _signature(src)
        samples = [
            {args.get(name, name): arr for name, arr in calibration.feed(i).items()}
            for i in range(calibration.samples)
        ]
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars would garble the CLI's progress bar
            calib_result = q.calibrate({key: samples}, num_threads=1)
    with contextlib.redirect_stderr(io.StringIO()):
        result = q.quantize(calib_result, enable_progress_bar=False, enable_progress_report=False)
    if result.quantized_model is None:
        raise ModelError(f"LiteRT Quantizer produced no model for recipe {recipe}")
    dst.write_bytes(bytes(result.quantized_model))


def is_float_io(path: Path) -> bool:
    _, outs = io_specs(path)
    return all(np.dtype(t.dtype).kind == "f" for t in outs)


def float_io(src: Path, dst: Path) -> int:
    """Give a full-int8 model the float inputs and outputs of its source: a QUANTIZE after each int8/int16
    graph input and a DEQUANTIZE before each such output, with the tensor's own scale and zero point.

    LiteRT Quantizer's static recipes quantize the graph's inputs and outputs too; clients (and the
    agent's API checks) send and expect the source's float tensors. The new float tensors take the
    original names (signatures keep pointing at them). Returns how many tensors were wrapped.
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    quantized = {schema.TensorType.INT8, schema.TensorType.INT16, schema.TensorType.UINT8}
    codes: dict[int, int] = {}

    def code(builtin: int) -> int:
        if builtin not in codes:
            found = next((i for i, c in enumerate(model.operatorCodes)
                          if flatbuffer_utils.get_builtin_code_from_operator_code(c) == builtin), None)
            if found is None:
                code_t = schema.OperatorCodeT()
                code_t.builtinCode = code_t.deprecatedBuiltinCode = builtin
                code_t.version = 2
                model.operatorCodes.append(code_t)
                found = len(model.operatorCodes) - 1
            codes[builtin] = found
        return codes[builtin]

    wrapped = 0
    for index, graph in enumerate(model.subgraphs):
        if index and not any(s.subgraphIndex == index for s in model.signatureDefs or []):
            continue  # control-flow bodies keep their tensors as they are
        renamed: dict[int, int] = {}
        before, after = [], []
        for kind, ends in (("input", graph.inputs), ("output", graph.outputs)):
            for pos, t_index in enumerate(ends):
                t = graph.tensors[t_index]
                if t.type not in quantized:
                    continue
                outer = schema.TensorT()
                outer.shape, outer.shapeSignature = t.shape, t.shapeSignature
                outer.type, outer.name, outer.buffer = schema.TensorType.FLOAT32, t.name, 0
                t.name = (t.name if isinstance(t.name, bytes) else str(t.name).encode()) + b"_quantized"
                graph.tensors.append(outer)
                new_index = len(graph.tensors) - 1
                op_t = schema.OperatorT()
                if kind == "input":
                    op_t.opcodeIndex = code(schema.BuiltinOperator.QUANTIZE)
                    op_t.inputs, op_t.outputs = [new_index], [int(t_index)]
                    before.append(op_t)
                else:
                    op_t.opcodeIndex = code(schema.BuiltinOperator.DEQUANTIZE)
                    op_t.inputs, op_t.outputs = [int(t_index)], [new_index]
                    after.append(op_t)
                ends[pos] = new_index
                renamed[int(t_index)] = new_index
                wrapped += 1
        graph.operators = before + list(graph.operators) + after
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                for m in [*sig.inputs, *sig.outputs]:
                    m.tensorIndex = renamed.get(m.tensorIndex, m.tensorIndex)
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return wrapped


def run_preserving_tensors(model: Path, data: Dataset) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Run ``model`` on each sample of ``data`` with every intermediate tensor kept readable: yields the
    interpreter after each invoke and the tensor details to read with ``get_tensor`` (calibration statistics)."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    with warnings.catch_warnings():  # "intended for debugging purposes only": it is what this needs
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(model_path=str(model), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inputs = {d["name"]: d["index"] for d in interp.get_input_details()}
    details = interp.get_tensor_details()
    for i in range(data.samples):
        for name, arr in data.feed(i).items():
            interp.set_tensor(inputs[name], arr.astype(np.float32))
        interp.invoke()
        yield interp, details
