"""The building blocks of a deploy: tensor specs and data, golden cases, the health spec, the runtime spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import MalformedMessageError
from agent.protocol.fields import (
    MAX_GOLDEN_CASES,
    Json,
    _extra,
    _get,
    _get_b64,
    _get_choice,
    _get_int,
    _get_obj,
    _get_str,
    _known,
    b64,
)

# -- building blocks ------------------------------------------------------------------------------

Dtype = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
DTYPES: tuple[str, ...] = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
#: ONNX Runtime's tensor type names -> the dtype names above (plus the unsigned ones a model may declare
#: locally); the agent's ONNX Runtime backend and the server's build pipeline both read this one table.
ONNX_DTYPES: Mapping[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
MAX_RANK = 8


def _get_shape(d: Mapping[str, Any], key: str) -> tuple[int, ...]:
    raw = _get(d, key, list)
    if len(raw) > MAX_RANK:
        raise MalformedMessageError(f"field {key!r} has rank over {MAX_RANK}", field=key)
    shape: list[int] = []
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < -1 or dim > 2**31:
            raise MalformedMessageError(f"field {key!r}: dimensions are integers >= -1 (-1 = dynamic)", field=key)
        shape.append(dim)
    return tuple(shape)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one model input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> Json:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(_get_str(d, "name"), _get_choice(d, "dtype", DTYPES), _get_shape(d, "shape"))


@dataclass(frozen=True)
class TensorData:
    """A concrete tensor: little-endian, C-order raw bytes of ``dtype`` with ``shape``."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_dict(self) -> Json:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": b64(self.data)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorData:
        return cls(_get_choice(d, "dtype", DTYPES), _get_shape(d, "shape"), _get_b64(d, "data", max_size=64 * 1024))


def _tensor_map(d: Mapping[str, Any], key: str) -> dict[str, TensorData]:
    raw = _get_obj(d, key)
    if len(raw) > 64:
        raise MalformedMessageError(f"field {key!r} has too many tensors", field=key)
    out: dict[str, TensorData] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise MalformedMessageError(f"field {key!r}.{name} must be a tensor object", field=key)
        out[name] = TensorData.from_dict(value)
    return out


@dataclass(frozen=True)
class GoldenCase:
    """An input with the outputs the server measured for it; the device must reproduce them."""

    inputs: Mapping[str, TensorData]
    outputs: Mapping[str, TensorData]
    atol: float = 1e-3
    rtol: float = 1e-2

    def to_dict(self) -> Json:
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "atol": self.atol,
            "rtol": self.rtol,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenCase:
        return cls(_tensor_map(d, "inputs"), _tensor_map(d, "outputs"), _get(d, "atol", float), _get(d, "rtol", float))


@dataclass(frozen=True)
class HealthSpec:
    """What the agent checks before switching (warm-up) and after (probation)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latency_budget_ms: float
    probation_s: float = 60.0
    probation_min_requests: int = 0
    max_error_rate: float = 0.01
    max_latency_regression: float = 1.5
    warmup_runs: int = 3
    golden: tuple[GoldenCase, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return {
            **self.extra,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "latency_budget_ms": self.latency_budget_ms,
            "probation_s": self.probation_s,
            "probation_min_requests": self.probation_min_requests,
            "max_error_rate": self.max_error_rate,
            "max_latency_regression": self.max_latency_regression,
            "warmup_runs": self.warmup_runs,
            "golden": [g.to_dict() for g in self.golden],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthSpec:
        golden = _get(d, "golden", list)
        if len(golden) > MAX_GOLDEN_CASES:
            raise MalformedMessageError(f"at most {MAX_GOLDEN_CASES} golden cases", field="golden")
        ins, outs = _get(d, "inputs", list), _get(d, "outputs", list)
        if len(ins) > 64 or len(outs) > 64:
            raise MalformedMessageError("at most 64 inputs and 64 outputs", field="inputs")
        return cls(
            inputs=tuple(TensorSpec.from_dict(_as_obj(t, "inputs")) for t in ins),
            outputs=tuple(TensorSpec.from_dict(_as_obj(t, "outputs")) for t in outs),
            latency_budget_ms=_get(d, "latency_budget_ms", float),
            probation_s=_get(d, "probation_s", float),
            probation_min_requests=_get_int(d, "probation_min_requests"),
            max_error_rate=_get(d, "max_error_rate", float),
            max_latency_regression=_get(d, "max_latency_regression", float),
            warmup_runs=_get_int(d, "warmup_runs", hi=1000),
            golden=tuple(GoldenCase.from_dict(_as_obj(g, "golden")) for g in golden),
            extra=_extra(d, _known(cls)),
        )


def _as_obj(value: Any, key: str) -> Json:
    if not isinstance(value, dict):
        raise MalformedMessageError(f"items of {key!r} must be objects", field=key)
    return value


@dataclass(frozen=True)
class RuntimeSpec:
    """What the device needs to run the artifact."""

    format: str  # "onnx" | "tflite"
    runtime: str  # "onnxruntime" | "litert"
    min_version: str = "0"
    execution_providers: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return {
            **self.extra,
            "format": self.format,
            "runtime": self.runtime,
            "min_version": self.min_version,
            "execution_providers": list(self.execution_providers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeSpec:
        providers = _get(d, "execution_providers", list)
        if len(providers) > 16 or not all(isinstance(p, str) and len(p) <= 64 for p in providers):
            raise MalformedMessageError(
                "execution_providers must be up to 16 short strings", field="execution_providers"
            )
        return cls(
            format=_get_choice(d, "format", ("onnx", "tflite")),
            runtime=_get_choice(d, "runtime", ("onnxruntime", "litert")),
            min_version=_get_str(d, "min_version", max_len=32),
            execution_providers=tuple(providers),
            extra=_extra(d, _known(cls)),
        )
