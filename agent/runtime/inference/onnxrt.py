"""ONNX Runtime backend. Imported only by ``open_session`` when an ONNX model is loaded.

Execution providers come from the profile (``RuntimeSpec.execution_providers``, full names or the
short aliases below), best first. Only those this onnxruntime build offers are kept, and CPU is
always last, so a profile written for a Jetson still loads on a gateway without a GPU. If the session
cannot be created with the accelerators (CUDA libraries missing at run time, a TensorRT build
failure), it is created once more on CPU alone; the providers in use are reported on the session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError, ModelLoadError
from agent.protocol.messages import ONNX_DTYPES, RuntimeSpec, TensorSpec
from agent.runtime.inference import InferenceOptions, SessionInfo, version_at_least

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
PROVIDER_ALIASES: Mapping[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": CPU,
    "xnnpack": "XnnpackExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "dml": "DmlExecutionProvider",
}



def _ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415 - the whole point: only when an ONNX model is loaded
    except ImportError as exc:
        raise ModelLoadError("onnxruntime is not installed (pip install 'edgefleet[onnx]')") from exc
    return onnxruntime


def _runtime_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (pybind11 types deriving from Exception) plus the Python ones."""
    state = ort.capi.onnxruntime_pybind11_state
    native = tuple(t for t in vars(state).values() if isinstance(t, type) and issubclass(t, Exception))
    return (*native, RuntimeError, ValueError, TypeError, OSError, MemoryError)


def select_providers(requested: tuple[str, ...], available: list[str]) -> list[str]:
    """Requested providers this build offers, best first, CPU always last (pure: unit-tested)."""
    chosen: list[str] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full in available and full not in chosen and full != CPU:
            chosen.append(full)
        elif full not in available:
            log.info("execution provider %s is not available in this onnxruntime build; skipped", full)
    chosen.append(CPU)
    return chosen


def provider_options(provider: str, options: InferenceOptions) -> dict[str, str]:
    """Options per provider, tuned for Jetson-class devices (pure: unit-tested)."""
    if provider == "TensorrtExecutionProvider":
        opts = {
            "device_id": "0",
            "trt_fp16_enable": "True" if options.trt_fp16 else "False",
            "trt_max_workspace_size": str(options.trt_workspace_bytes),
        }
        if options.cache_dir is not None:
            cache = str(options.cache_dir / "tensorrt")
            opts |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            }
        return opts
    if provider == "CUDAExecutionProvider":
        return {
            "device_id": "0",
            # grow the arena by what is asked, not by powers of two: Jetson shares RAM with the CPU
            "arena_extend_strategy": "kSameAsRequested",
            # exhaustive cuDNN autotuning makes the first inference (the warm-up) take seconds
            "cudnn_conv_algo_search": "HEURISTIC",
        }
    return {}


def _spec(arg: Any) -> TensorSpec:
    dtype = ONNX_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which the agent cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


class OnnxRuntimeSession(SessionInfo):
    """An ``onnxruntime.InferenceSession`` behind the ``Session`` interface (``run`` is thread-safe)."""

    def __init__(self, session: Any, errors: tuple[type[BaseException], ...], ort: Any) -> None:
        self._session: Any = session
        self._run_options = ort.RunOptions()
        # a failing request is an InferenceError for the caller and a count in the stats; keep it out of stderr
        self._run_options.log_severity_level = 4
        self._errors = errors
        super().__init__(
            f"onnxruntime {ort.__version__}",
            tuple(session.get_providers()),
            tuple(_spec(a) for a in session.get_inputs()),
            tuple(_spec(a) for a in session.get_outputs()),
        )
        self._output_names = [o.name for o in self.outputs]

    @classmethod
    def load(cls, path: Path, runtime: RuntimeSpec, options: InferenceOptions) -> OnnxRuntimeSession:
        ort = _ort()
        if not version_at_least(ort.__version__, runtime.min_version):
            raise ModelLoadError(f"model needs onnxruntime >= {runtime.min_version}, this device has {ort.__version__}")
        errors = _runtime_errors(ort)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: warnings go through our own log
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if options.allow_spinning else "0")
        providers = select_providers(runtime.execution_providers, list(ort.get_available_providers()))
        if options.cache_dir is not None and "TensorrtExecutionProvider" in providers:
            (options.cache_dir / "tensorrt").mkdir(parents=True, exist_ok=True)
        try:
            session = cls._create(ort, path, so, providers, options)
        except errors as exc:
            if providers == [CPU]:
                raise ModelLoadError(f"onnxruntime could not load {path.name}: {exc}") from exc
            log.warning("loading %s with %s failed (%s); retrying on CPU only", path.name, providers, exc)
            try:
                session = cls._create(ort, path, so, [CPU], options)
            except errors as cpu_exc:
                raise ModelLoadError(f"onnxruntime could not load {path.name}: {cpu_exc}") from cpu_exc
        return cls(session, errors, ort)

    @staticmethod
    def _create(ort: Any, path: Path, so: Any, providers: list[str], options: InferenceOptions) -> Any:
        return ort.InferenceSession(
            str(path),
            sess_options=so,
            providers=providers,
            provider_options=[provider_options(p, options) for p in providers],
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise InferenceError("session is closed")
        try:
            results = session.run(self._output_names, dict(feeds), self._run_options)
        except self._errors as exc:
            raise InferenceError(f"onnxruntime: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        # onnxruntime frees the session (arena, thread pool) when the last reference goes
        self._session = None
