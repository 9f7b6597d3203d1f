"""Delta-friendly quantization: requantize version N+1 with version N's scales and zero-points.

A fresh calibration rescales every tensor a little, which changes nearly every int8 byte and defeats a delta.
``reuse_scales`` takes the freshly quantized QDQ model of N+1, its float source, and the previous quantized build,
and writes a model whose scale/zero-point initializers are N's and whose quantized weights are N+1's float weights
quantized with them (clipped to the integer range). Two levels are tried, the caller's gate decides:
``all`` (weights and activations keep N's scales) then ``weights`` (activations keep the fresh calibration, so
only biases, whose scale is input scale x weight scale, are recomputed). If neither passes, the fresh model stays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

QUANT_SUFFIX = "_quantized"


def _requantize(fresh: Path, float_src: Path, previous: Path, out: Path, *, level: str) -> list[str]:
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    model = onnx.load(str(fresh))
    prev = onnx.load(str(previous))
    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(float_src)).graph.initializer}
    prev_init = {i.name: numpy_helper.to_array(i) for i in prev.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}

    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    # at level "weights", int32 biases keep their fresh scale (input scale x weight scale; the input's is fresh)
    weight_params = {p for n in weight_dq if arrays[n.input[0]].dtype != np.int32 for p in n.input[1:3] if p}
    new: dict[str, np.ndarray] = {}
    # scale/zero-point initializers to take from N
    for name, value in arrays.items():
        if name.endswith(QUANT_SUFFIX) or name not in prev_init:
            continue
        if not (name.endswith(("_scale", "_zero_point"))):
            continue
        if level == "weights" and name not in weight_params:
            continue
        old = prev_init[name]
        if old.shape == value.shape and old.dtype == value.dtype:
            new[name] = old
    # bias scales follow the (possibly fresh) input scale x (old) weight scale: recompute from the graph
    scale_of = {**arrays, **new}
    reused: list[str] = []
    for node in weight_dq:
        qname, sname = node.input[0], node.input[1]
        zname = node.input[2] if len(node.input) > 2 else ""
        fname = qname.removesuffix(QUANT_SUFFIX)
        if fname not in floats or sname not in scale_of:
            continue
        qdtype = arrays[qname].dtype
        scale = scale_of[sname]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        w = floats[fname].astype(np.float64)
        zp = scale_of[zname].astype(np.int64) if zname and zname in scale_of else np.zeros_like(scale, np.int64)
        shape = [1] * w.ndim
        if scale.ndim == 1 and w.ndim > 0 and scale.size > 1:
            shape[axis] = -1
        s = scale.astype(np.float64).reshape(shape) if scale.ndim else scale.astype(np.float64)
        z = zp.reshape(shape) if zp.ndim else zp
        info = np.iinfo(qdtype)
        q = np.clip(np.rint(w / s) + z, info.min, info.max).astype(qdtype)
        new[qname] = q
        reused.append(fname)
    for name, value in new.items():
        if np.array_equal(arrays[name], value):
            continue  # unchanged: keep the tensor's bytes exactly as they were
        tensor = inits[name]
        if tensor.raw_data:
            tensor.raw_data = np.ascontiguousarray(value, arrays[name].dtype).tobytes()
        else:  # typed storage (float_data / int32_data): keep it, so the file layout does not move
            tensor.CopyFrom(
                onnx.helper.make_tensor(name, tensor.data_type, list(tensor.dims), value.flatten().tolist())
            )
    onnx.save(model, str(out))
    return reused


def reuse_scales(
    fresh: Path,
    float_src: Path,
    previous: Path,
    out: Path,
    gate: Callable[[Path], bool],
) -> str:
    """Write the most delta-friendly model that passes ``gate`` to ``out``; returns the level kept:
    ``all``, ``weights`` or ``none`` (``out`` is then a copy of ``fresh``)."""
    import shutil  # noqa: PLC0415

    for level in ("all", "weights"):
        try:
            _requantize(fresh, float_src, previous, out, level=level)
        except (KeyError, ValueError):
            continue
        if gate(out):
            return level
    shutil.copyfile(fresh, out)
    return "none"


def reuse_previous(builder: Any, chosen: Any, previous: Path | None) -> Any:
    """The pipeline's hook: when the chosen candidate is a static int8 ONNX model and the previous version's
    build for the same profile is known, keep its scales where the candidate still passes the same gate.
    Returns ``chosen`` itself, or a copy of it pointing at the requantized file."""
    from dataclasses import replace  # noqa: PLC0415

    from server.compression.gate import check_fidelity, measure_fidelity  # noqa: PLC0415
    from server.compression.runners import open_runner, run_dataset  # noqa: PLC0415

    if previous is None or chosen.path is None or chosen.recipe.kind != "static" or not previous.is_file():
        return chosen
    if chosen.path.suffix != ".onnx" or previous.suffix != ".onnx":
        return chosen

    def gate(path: Path) -> bool:
        outputs = run_dataset(open_runner(path, "onnx"), builder.evaluation)
        fid = measure_fidelity(builder.reference, outputs, builder.gate, builder.evaluation.labels)
        return check_fidelity(fid, builder.gate) is None

    out = chosen.path.with_name(f"{chosen.path.stem}.reuse{chosen.path.suffix}")
    try:
        level = reuse_scales(chosen.path, builder.pre, previous, out, gate)
    except Exception:  # noqa: BLE001 - a failed reuse leaves the fresh build, which already passed
        builder.notes.append("scale reuse from the previous version failed; fresh calibration kept")
        return chosen
    if level == "none":
        builder.notes.append("scale reuse from the previous version did not pass the gate; fresh calibration kept")
        return chosen
    builder.notes.append(f"quantization scales reused from the previous version ({level})")
    data = out.read_bytes()
    return replace(chosen, path=out, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
