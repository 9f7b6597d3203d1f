"""Inference backends behind one small interface.

``open_session(path, runtime, options)`` returns a ``Session`` for ONNX Runtime or LiteRT, chosen by
``RuntimeSpec.runtime``. The runtimes are imported here lazily, inside ``open_session``: importing any
agent module never imports onnxruntime or LiteRT, so a board that serves only .tflite models never
pays for ONNX Runtime, and the agent starts fast.

Every backend translates its runtime's exceptions at this seam: loading raises ``ModelLoadError``,
running raises ``InferenceError`` (both ``raise ... from`` the runtime's own error).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import ConfigError, ModelLoadError
from agent.protocol.messages import RuntimeSpec, TensorSpec

__all__ = ["InferenceOptions", "Session", "open_session", "version_at_least"]


@dataclass(frozen=True)
class InferenceOptions:
    """How the backends run models on this device (agent config ``[inference]``).

    intra_op_threads    threads one inference may use; 0 = the runtime's default (one per core).
                        Limits: 0..256.
    inter_op_threads    ONNX Runtime threads running independent graph branches; 1 = sequential. 0..64.
    allow_spinning      let ONNX Runtime's worker threads busy-wait between ops (lower latency under
                        load, burns a core while idle-ish: off by default on battery/thermal-bound boards).
    cache_dir           where TensorRT keeps engine and timing caches (a reload of a kept version, i.e.
                        a rollback, then takes seconds instead of minutes); None = no caches.
    trt_fp16            let TensorRT build fp16 engines (Jetson: ~2x faster, accuracy checked by the
                        health check's golden outputs).
    trt_workspace_bytes TensorRT builder workspace; Jetson shares memory with the CPU, keep it modest.
    litert_interpreters LiteRT interpreters per model (an interpreter runs one request at a time;
                        more interpreters = more parallel requests, more memory). 1..16.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    cache_dir: Path | None = None
    trt_fp16: bool = True
    trt_workspace_bytes: int = 1 << 30
    litert_interpreters: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.intra_op_threads <= 256:
            raise ConfigError("intra_op_threads must be within 0..256", field="intra_op_threads")
        if not 0 <= self.inter_op_threads <= 64:
            raise ConfigError("inter_op_threads must be within 0..64", field="inter_op_threads")
        if not 1 <= self.litert_interpreters <= 16:
            raise ConfigError("litert_interpreters must be within 1..16", field="litert_interpreters")
        if self.trt_workspace_bytes < 1 << 20:
            raise ConfigError("trt_workspace_bytes must be at least 1 MiB", field="trt_workspace_bytes")


class Session(Protocol):
    """One loaded model in one runtime. ``run`` is safe to call from several threads at once."""

    @property
    def backend(self) -> str:
        """Runtime and version, e.g. ``onnxruntime 1.20.1``."""
        ...

    @property
    def providers(self) -> tuple[str, ...]:
        """Execution providers / delegates actually in use, best first (``CPUExecutionProvider``...)."""
        ...

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; raises InferenceError. Feeds are already validated against ``inputs``."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; ``run`` must not be called afterwards."""
        ...


@dataclass
class SessionInfo:
    """What a backend's session reports about itself: the read-only half of ``Session``, set once at load."""

    backend: str
    providers: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}


def open_session(path: Path, runtime: RuntimeSpec, options: InferenceOptions) -> Session:
    """Load ``path`` in the runtime ``runtime`` names; raises ModelLoadError."""
    expected_format = _FORMATS.get(runtime.runtime)
    if expected_format is None:
        raise ModelLoadError(f"unknown runtime {runtime.runtime!r} (this agent has onnxruntime and litert)")
    if runtime.format != expected_format:
        raise ModelLoadError(f"runtime {runtime.runtime} cannot load format {runtime.format!r}")
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if runtime.runtime == "onnxruntime":
        from agent.runtime.inference.onnxrt import OnnxRuntimeSession  # noqa: PLC0415 - lazy by design

        return OnnxRuntimeSession.load(path, runtime, options)
    from agent.runtime.inference.litert import LiteRtSession  # noqa: PLC0415 - lazy by design

    return LiteRtSession.load(path, runtime, options)


def _version_tuple(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def version_at_least(installed: str, minimum: str) -> bool:
    """Numeric comparison of dotted versions (``1.17.3 >= 1.17``); suffixes like ``rc1``/``+cu12`` ignored."""
    a, b = _version_tuple(installed), _version_tuple(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))
