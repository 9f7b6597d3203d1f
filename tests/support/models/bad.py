"""Misbehaving variants of a real ONNX model, made by graph surgery (for health-check and rollback tests).

Each builder reads a real model, appends a few nodes to its graph and writes a new file; the
outputs keep their names, so a variant is a drop-in "v2" of the model it came from:

    nan_variant(src, dst)                every float output becomes NaN          -> check "finite"
    wrong_shape_variant(src, dst)        first output's last dimension doubled   -> check "shape"
    wrong_dtype_variant(src, dst)        first float output cast to float64      -> check "dtype"
    slow_variant(src, dst, extra_ms=..)  a loop of matmuls adds ~extra_ms        -> check "latency"
    failing_on_real_data_variant(...)    passes warm-up probes (random floats, never exactly 0),
                                         raises in the runtime on real inputs (images with black
                                         pixels, padded token ids: many exact zeros) -> probation
    scaled_output_variant(src, dst, f)   first output times f: runs fine, numerically off -> check "golden"
    identity_variant(src, dst)           same outputs, different bytes (a benign "v2")

Shared by the serving tests, the agent lifecycle tests and the fault suite. Needs ``onnx`` (server extra).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _load(src: Path) -> onnx.ModelProto:
    return onnx.load(str(src))


def _save(model: onnx.ModelProto, dst: Path) -> Path:
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def _reroute_output(graph: onnx.GraphProto, name: str) -> str:
    """Rename the tensor feeding graph output ``name`` to a fresh internal name and return it."""
    internal = f"{name}__orig"
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == name:
                node.output[i] = internal
        for i, inp in enumerate(node.input):
            if inp == name:
                node.input[i] = internal
    return internal


def _float_outputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    return [o for o in graph.output if o.type.tensor_type.elem_type in _FLOAT_TYPES]


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name=name))
    return name


def _np_float(elem_type: int) -> type[np.floating]:
    return {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}[elem_type]


def identity_variant(src: Path, dst: Path, *, tag: str = "v2") -> Path:
    """Same computation, different file (a benign new version): only the doc string changes."""
    model = _load(src)
    model.doc_string = f"{model.doc_string} [{tag}]".strip()
    return _save(model, dst)


def nan_variant(src: Path, dst: Path) -> Path:
    """Every float output is NaN (x + NaN)."""
    model = _load(src)
    g = model.graph
    for out in _float_outputs(g):
        internal = _reroute_output(g, out.name)
        nan = _const(g, f"{out.name}__nan", np.array(np.nan, dtype=_np_float(out.type.tensor_type.elem_type)))
        g.node.append(helper.make_node("Add", [internal, nan], [out.name], name=f"{out.name}__make_nan"))
    return _save(model, dst)


def wrong_shape_variant(src: Path, dst: Path) -> Path:
    """The first output's last dimension doubles (Concat of the output with itself)."""
    model = _load(src)
    g = model.graph
    out = g.output[0]
    internal = _reroute_output(g, out.name)
    g.node.append(helper.make_node("Concat", [internal, internal], [out.name], axis=-1, name=f"{out.name}__twice"))
    dims = out.type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value"):
        dims[-1].dim_value *= 2
    _drop_value_info(g, out.name)
    return _save(model, dst)


def wrong_dtype_variant(src: Path, dst: Path) -> Path:
    """The first float output is cast to float64."""
    model = _load(src)
    g = model.graph
    out = _float_outputs(g)[0]
    internal = _reroute_output(g, out.name)
    g.node.append(helper.make_node("Cast", [internal], [out.name], to=TensorProto.DOUBLE, name=f"{out.name}__f64"))
    out.type.tensor_type.elem_type = TensorProto.DOUBLE
    _drop_value_info(g, out.name)
    return _save(model, dst)


def _drop_value_info(g: onnx.GraphProto, name: str) -> None:
    keep = [v for v in g.value_info if v.name != name]
    del g.value_info[:]
    g.value_info.extend(keep)


def _first_float_input(g: onnx.GraphProto) -> str:
    initializers = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name not in initializers and inp.type.tensor_type.elem_type in _FLOAT_TYPES:
            return inp.name
    raise ValueError("model has no float input to hang the extra computation on")


def _add_zero_dependency(g: onnx.GraphProto, out: onnx.ValueInfoProto, scalar: str, tag: str) -> None:
    """out = out_orig + 0 * scalar: the output now depends on ``scalar`` without changing value."""
    elem = out.type.tensor_type.elem_type
    internal = _reroute_output(g, out.name)
    cast = f"{tag}__cast"
    g.node.append(helper.make_node("Cast", [scalar], [cast], to=elem, name=cast))
    zero = _const(g, f"{tag}__zero", np.array(0, dtype=_np_float(elem)))
    g.node.append(helper.make_node("Mul", [cast, zero], [f"{tag}__zeroed"], name=f"{tag}__mul0"))
    g.node.append(helper.make_node("Add", [internal, f"{tag}__zeroed"], [out.name], name=f"{tag}__add0"))


def _matmul_loop_variant(src: Path, dst: Path, iterations: int, size: int) -> Path:
    model = _load(src)
    g = model.graph
    x = _first_float_input(g)
    t = "slow"
    # A = (mean(x) * 0 + 1/size) broadcast to size x size: depends on the input, so it is never
    # constant-folded; A @ A == A, so the values stay finite however many iterations run.
    g.node.append(helper.make_node("ReduceMean", [x], [f"{t}__m"], keepdims=0, name=f"{t}__mean"))
    g.node.append(helper.make_node("Cast", [f"{t}__m"], [f"{t}__m32"], to=TensorProto.FLOAT, name=f"{t}__c"))
    zero = _const(g, f"{t}__z", np.array(0.0, dtype=np.float32))
    fill = _const(g, f"{t}__fill", np.full((size, size), 1.0 / size, dtype=np.float32))
    g.node.append(helper.make_node("Mul", [f"{t}__m32", zero], [f"{t}__m0"], name=f"{t}__mul"))
    g.node.append(helper.make_node("Add", [fill, f"{t}__m0"], [f"{t}__a0"], name=f"{t}__seed"))
    trip = _const(g, f"{t}__trip", np.array(iterations, dtype=np.int64))
    cond = _const(g, f"{t}__cond", np.array(True))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["a_in", "a_in"], ["a_out"]),
        ],
        f"{t}__body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    g.node.append(helper.make_node("Loop", [trip, cond, f"{t}__a0"], [f"{t}__a"], body=body, name=f"{t}__loop"))
    g.node.append(helper.make_node("ReduceSum", [f"{t}__a"], [f"{t}__s"], keepdims=0, name=f"{t}__sum"))
    _add_zero_dependency(g, _float_outputs(g)[0], f"{t}__s", t)
    return _save(model, dst)


def slow_variant(src: Path, dst: Path, *, extra_ms: float, size: int = 256) -> Path:
    """Adds roughly ``extra_ms`` per inference on this machine (single-threaded), measured, not guessed.

    Calibrates once: times a short loop with onnxruntime, then sizes the loop for ``extra_ms``.
    """
    import onnxruntime as ort

    probe_iters = 20
    probe = _matmul_loop_variant(src, dst, probe_iters, size)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64}.get(inp.type, np.float32)
        feeds[inp.name] = np.ones(shape, dtype=dtype)
    session.run(None, feeds)
    best = min(_timed(session, feeds) for _ in range(3))
    per_iter_ms = max(best / probe_iters, 1e-3)
    return _matmul_loop_variant(src, dst, max(1, round(extra_ms / per_iter_ms)), size)


def _timed(session: object, feeds: dict[str, np.ndarray]) -> float:
    started = time.perf_counter()
    session.run(None, feeds)  # type: ignore[attr-defined]
    return (time.perf_counter() - started) * 1000.0


def failing_on_real_data_variant(
    src: Path, dst: Path, *, zero_fraction: float = 0.1, threshold: float | None = None
) -> Path:
    """Runs fine on the health check's probes but raises inside onnxruntime on real inputs (a Gather with
    an out-of-range index): the model passes warm-up and then fails real traffic, which only probation
    (or golden cases taken from real data) can catch.

    Trigger, on the first float input: by default, more than ``zero_fraction`` of its elements exactly 0
    (real images and padded inputs are; the uniform random probes never are); with ``threshold``, any
    element above it instead (for inputs whose real values exceed the probes' [0, 1) range).
    """
    model = _load(src)
    g = model.graph
    x = _first_float_input(g)
    elem = next(i.type.tensor_type.elem_type for i in g.input if i.name == x)
    t = "fragile"
    if threshold is None:
        zero = _const(g, f"{t}__zero_in", np.array(0, dtype=_np_float(elem)))
        g.node.append(helper.make_node("Equal", [x, zero], [f"{t}__is0"], name=f"{t}__eq"))
        g.node.append(helper.make_node("Cast", [f"{t}__is0"], [f"{t}__is0f"], to=TensorProto.FLOAT, name=f"{t}__c"))
        g.node.append(helper.make_node("ReduceMean", [f"{t}__is0f"], [f"{t}__score"], keepdims=0, name=f"{t}__mean"))
        limit = _const(g, f"{t}__limit", np.array(zero_fraction, dtype=np.float32))
    else:
        g.node.append(helper.make_node("ReduceMax", [x], [f"{t}__max"], keepdims=0, name=f"{t}__reducemax"))
        g.node.append(helper.make_node("Cast", [f"{t}__max"], [f"{t}__score"], to=TensorProto.FLOAT, name=f"{t}__c"))
        limit = _const(g, f"{t}__limit", np.array(threshold, dtype=np.float32))
    big = _const(g, f"{t}__big", np.array(1_000_000, dtype=np.int64))
    table = _const(g, f"{t}__table", np.array([0.0], dtype=np.float32))
    g.node.append(helper.make_node("Greater", [f"{t}__score", limit], [f"{t}__over"], name=f"{t}__gt"))
    g.node.append(helper.make_node("Cast", [f"{t}__over"], [f"{t}__over64"], to=TensorProto.INT64, name=f"{t}__ci"))
    g.node.append(helper.make_node("Mul", [f"{t}__over64", big], [f"{t}__index"], name=f"{t}__idx"))
    g.node.append(helper.make_node("Gather", [table, f"{t}__index"], [f"{t}__picked"], axis=0, name=f"{t}__gather"))
    _add_zero_dependency(g, _float_outputs(g)[0], f"{t}__picked", t)
    return _save(model, dst)


def scaled_output_variant(src: Path, dst: Path, *, factor: float = 1.1) -> Path:
    """The first float output multiplied by ``factor``: runs, finite, right shape, wrong numbers."""
    model = _load(src)
    g = model.graph
    out = _float_outputs(g)[0]
    internal = _reroute_output(g, out.name)
    scale = _const(g, f"{out.name}__scale", np.array(factor, dtype=_np_float(out.type.tensor_type.elem_type)))
    g.node.append(helper.make_node("Mul", [internal, scale], [out.name], name=f"{out.name}__scaled"))
    return _save(model, dst)
