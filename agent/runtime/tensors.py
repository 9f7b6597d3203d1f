"""Tensor helpers shared by the host, the health check and the HTTP API (numpy, no runtime).

* dtype names: the contract's (``float32``...), numpy's, and the Open Inference Protocol's (``FP32``...);
* ``TensorData`` (little-endian raw bytes in messages) <-> ``np.ndarray``;
* shape compatibility with ``-1`` as a dynamic dimension;
* probe inputs for warm-up runs, built from a ``TensorSpec``;
* golden comparison with atol/rtol that says how far off the worst element was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.protocol.messages import DTYPES, TensorData, TensorSpec

#: Contract dtype name -> OIP (KServe v2) datatype.
OIP_DATATYPES: Mapping[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
DTYPES_BY_OIP: Mapping[str, str] = {v: k for k, v in OIP_DATATYPES.items()}

MAX_TENSOR_ELEMENTS = 1 << 28  # 256 Mi elements: anything larger is a malformed request on an edge device


def dtype_name(dtype: np.dtype[np.generic] | type | str) -> str:
    """The contract's name of a numpy dtype (``np.float32`` -> ``"float32"``)."""
    return str(np.dtype(dtype).name)


def numpy_dtype(name: str) -> np.dtype[np.generic]:
    """numpy dtype of a contract name, little-endian."""
    if name not in OIP_DATATYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    dtype: np.dtype[np.generic] = np.dtype(name).newbyteorder("<")
    return dtype


def to_oip(name: str) -> str:
    try:
        return OIP_DATATYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} has no Open Inference Protocol datatype") from None


def from_oip(datatype: str) -> str:
    try:
        return DTYPES_BY_OIP[datatype]
    except KeyError:
        known = ", ".join(sorted(DTYPES_BY_OIP))
        raise ValueError(f"unsupported datatype {datatype!r} (supported: {known})") from None


def element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"shape {list(shape)} has a negative dimension")
        count *= dim
        if count > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"shape {list(shape)} has more than {MAX_TENSOR_ELEMENTS} elements")
    return count


def array_from_tensor(tensor: TensorData) -> np.ndarray:
    """``TensorData`` -> array (a copy, native byte order); ValueError when the bytes do not fit the shape."""
    dtype = numpy_dtype(tensor.dtype)
    count = element_count(tensor.shape)
    if len(tensor.data) != count * dtype.itemsize:
        raise ValueError(
            f"{tensor.dtype}{list(tensor.shape)} needs {count * dtype.itemsize} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape).astype(dtype.newbyteorder("="))


def tensor_from_array(array: np.ndarray) -> TensorData:
    """Array -> ``TensorData`` (little-endian, C order)."""
    name = dtype_name(array.dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot travel in a message (allowed: {', '.join(DTYPES)})")
    data = np.ascontiguousarray(array, dtype=numpy_dtype(name)).tobytes()
    return TensorData(dtype=name, shape=tuple(int(d) for d in array.shape), data=data)


def shape_fits(actual: Sequence[int], declared: Sequence[int]) -> bool:
    """Whether a concrete shape matches a declared one (-1 = any size in that dimension)."""
    return len(actual) == len(declared) and all(d in (-1, a) for a, d in zip(actual, declared, strict=True))


def shapes_compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two declared shapes can describe the same tensor (either side may be -1)."""
    return len(a) == len(b) and all(-1 in (x, y) or x == y for x, y in zip(a, b, strict=True))


def probe_array(spec: TensorSpec, *, seed: int = 0) -> np.ndarray:
    """A deterministic input for warm-up runs: dynamic dims become 1.

    Floats are uniform in [0, 1) (finite, in the range most preprocessing produces); integers are
    ones (a valid token id, mask value or class index for any model with more than one); bools True.
    """
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    dtype = numpy_dtype(spec.dtype).newbyteorder("=")
    if dtype.kind == "f":
        return np.random.default_rng(seed).random(shape, dtype=np.float64).astype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype=dtype)
    return np.ones(shape, dtype=dtype)


def is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


def all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """True when no float output holds NaN or Inf (cheap: one vectorised pass per float output)."""
    for array in outputs.values():  # noqa: SIM110 - a plain loop: this runs on every request
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return False
    return True


@dataclass(frozen=True)
class GoldenMismatch:
    output: str
    reason: str
    max_abs_err: float | None = None
    bad_elements: int = 0


def compare_golden(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], *, atol: float, rtol: float
) -> tuple[GoldenMismatch | None, float]:
    """Compare every expected output; returns (the first mismatch or None, max |actual - expected|).

    Same rule as ``np.allclose``: ``|a - e| <= atol + rtol * |e|`` element-wise; NaN never matches.
    """
    worst = 0.0
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            return GoldenMismatch(name, f"output {name!r} missing"), worst
        if got.shape != want.shape:
            reason = f"output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}"
            return GoldenMismatch(name, reason), worst
        if got.size == 0:
            continue
        g = got.astype(np.float64)
        w = want.astype(np.float64)
        diff = np.abs(g - w)
        bad = ~(diff <= atol + rtol * np.abs(w))  # NaN compares False, so it counts as bad
        max_err = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
        worst = max(worst, max_err) if not np.isnan(max_err) else float("nan")
        n_bad = int(bad.sum())
        if n_bad:
            return (
                GoldenMismatch(
                    name,
                    f"output {name!r}: {n_bad} of {got.size} elements outside atol={atol} rtol={rtol} "
                    f"(max abs error {max_err:.3g})",
                    max_abs_err=max_err,
                    bad_elements=n_bad,
                ),
                worst,
            )
    return None, worst
