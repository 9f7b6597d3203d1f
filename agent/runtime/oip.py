"""Open Inference Protocol (KServe v2) request/response codec, with the binary tensor data extension.

Pure translation between HTTP bodies and numpy arrays; the server (``agent.runtime.http``) does the I/O.
Every problem with a request raises ``InvalidInputError`` with a message meant for the client (HTTP 400).

Request body (JSON, or JSON followed by binary tensor data when the ``Inference-Header-Content-Length``
header gives the JSON part's length)::

    {"id": "42", "parameters": {"binary_data_output": false},
     "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0, ...]},
                {"name": "mask", "shape": [1, 8], "datatype": "INT64", "parameters": {"binary_data_size": 64}}],
     "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}

``data`` may be flat (row-major) or nested. Inputs with ``binary_data_size`` take that many bytes,
little-endian, from the binary part, in input order. Outputs are all returned when ``outputs`` is
absent; an output is sent as binary when it asks for ``binary_data`` (or the request sets
``binary_data_output``), else as a flat JSON list. Non-finite floats are written as the JSON
extensions ``NaN``/``Infinity`` (Python and most clients read them; use binary outputs for strict parsers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import __version__
from agent.errors import InvalidInputError
from agent.protocol.messages import TensorSpec
from agent.runtime.tensors import MAX_TENSOR_ELEMENTS, from_oip, numpy_dtype, shape_fits, to_oip

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "model_statistics")
MAX_TENSORS = 64
MAX_RANK = 8
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}


@dataclass(frozen=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: tuple[str, ...] | None = None  # requested output names, None = all
    binary_outputs: frozenset[str] = frozenset()  # requested names to send as binary
    binary_default: bool = False  # request-level binary_data_output
    parameters: Mapping[str, Any] = field(default_factory=dict)


def _bad(message: str, tensor: str | None = None) -> InvalidInputError:
    return InvalidInputError(message, tensor=tensor)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_infer_request(body: bytes, *, header_length: int | None = None) -> InferRequest:
    """Decode an infer request body; raises InvalidInputError (HTTP 400) with a client-facing message."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise _bad(f"{HEADER_LENGTH}={header_length} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        obj = json.loads(json_part, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _bad("request body must be a JSON object")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    params = _parameters(obj, "request")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    if len(raw_inputs) > MAX_TENSORS:
        raise _bad(f"at most {MAX_TENSORS} inputs")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _parse_input(raw, binary, offset)
        if name in inputs:
            raise _bad(f"input {name!r} appears twice", name)
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise _bad(f"binary part has {len(binary)} bytes, inputs use {offset}")
    outputs, binary_outputs = _parse_outputs(obj.get("outputs"))
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad("parameter 'binary_data_output' must be a boolean")
    return InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
        parameters=params,
    )


def _parameters(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{what} 'parameters' must be an object")
    return params


def _parse_input(raw: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise _bad("each input must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise _bad("input 'name' must be a non-empty string")
    shape = _parse_shape(raw.get("shape"), name)
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise _bad(f"input {name!r}: 'datatype' must be a string such as \"FP32\"", name)
    try:
        dtype = numpy_dtype(from_oip(datatype))
    except ValueError as exc:
        raise _bad(f"input {name!r}: {exc}", name) from exc
    count = 1
    for dim in shape:
        count *= dim
    if count > MAX_TENSOR_ELEMENTS:
        raise _bad(f"input {name!r}: shape {shape} is too large", name)
    params = _parameters(raw, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer", name)
        if "data" in raw:
            raise _bad(f"input {name!r}: give either 'data' or binary_data_size, not both", name)
        if size != count * dtype.itemsize:
            raise _bad(f"input {name!r}: {datatype}{shape} needs {count * dtype.itemsize} bytes, got {size}", name)
        if offset + size > len(binary):
            raise _bad(f"input {name!r}: binary part ends before its {size} bytes", name)
        chunk = binary[offset : offset + size]
        array = np.frombuffer(chunk, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        return name, array, size
    if "data" not in raw:
        raise _bad(f"input {name!r} has no 'data' (and no binary_data_size)", name)
    data = raw["data"]
    if not isinstance(data, list):
        data = [data]
    try:
        array = np.array(data, dtype=dtype.newbyteorder("="))
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(f"input {name!r}: data is not a (nested) list of {datatype} values: {exc}", name) from exc
    if array.size != count:
        raise _bad(f"input {name!r}: shape {shape} needs {count} values, got {array.size}", name)
    return name, array.reshape(shape), 0


def _parse_shape(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK:
        raise _bad(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} dimensions", name)
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise _bad(f"input {name!r}: shape {raw} must hold non-negative integers", name)
    return list(raw)


def _parse_outputs(raw: Any) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    if raw is None:
        return None, frozenset()
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    names: list[str] = []
    binary: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("each requested output must be an object with a 'name'")
        name = item["name"]
        names.append(name)
        flag = _parameters(item, f"output {name!r}").get("binary_data", False)
        if not isinstance(flag, bool):
            raise _bad(f"output {name!r}: binary_data must be a boolean")
        if flag:
            binary.add(name)
    return tuple(names), frozenset(binary)


def check_request_fits(request: InferRequest, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Client-facing checks against the model, in the protocol's own terms (FP32 rather than float32).

    The host validates again when it runs (the model may have been swapped in between).
    """
    declared = {s.name: s for s in inputs}
    for name, array in request.inputs.items():
        spec = declared.get(name)
        if spec is None:
            raise _bad(f"model has no input {name!r} (inputs: {', '.join(declared)})", name)
        want = to_oip(spec.dtype)
        got = to_oip(str(array.dtype))
        if want != got:
            raise _bad(f"input {name!r}: datatype {got} does not match the model's {want}", name)
        if not shape_fits(array.shape, spec.shape):
            raise _bad(f"input {name!r}: shape {list(array.shape)} does not fit the model's {list(spec.shape)}", name)
    missing = [n for n in declared if n not in request.inputs]
    if missing:
        raise _bad(f"missing input(s): {', '.join(missing)}", missing[0])
    if request.outputs is not None:
        known = {s.name for s in outputs}
        for name in request.outputs:
            if name not in known:
                raise _bad(f"model has no output {name!r} (outputs: {', '.join(sorted(known))})", name)


def encode_infer_response(
    request: InferRequest, outputs: Mapping[str, np.ndarray], *, model_name: str, model_version: int
) -> tuple[bytes, int | None]:
    """Response body, and the JSON part's length when binary data follows (for the header) else None."""
    names = request.outputs if request.outputs is not None else tuple(outputs)
    items: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        array = outputs[name]
        item: dict[str, Any] = {"name": name, "datatype": to_oip(str(array.dtype)), "shape": list(array.shape)}
        if name in request.binary_outputs or request.binary_default:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = array.ravel().tolist()
        items.append(item)
    response: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version), "outputs": items}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join((head, *blobs)), len(head)


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": to_oip(s.dtype), "shape": list(s.shape)} for s in specs]


def server_metadata() -> dict[str, Any]:
    return {"name": "edgefleet-agent", "version": __version__, "extensions": list(EXTENSIONS)}
