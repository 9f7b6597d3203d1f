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
    """
    from ai_edge_litert import schema_py_generated as schema  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    folded = 0
    for graph in model.subgraphs:
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
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return folded


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
    if fold_fp16_weights(src, unfolded):
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
