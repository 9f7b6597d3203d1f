"""LiteRT (TensorFlow Lite) backend. Imported only by ``open_session`` when a .tflite model is loaded.

Runtime: ``ai_edge_litert.interpreter`` (works with NumPy 2), falling back to the older
``tflite_runtime.interpreter`` (which needs NumPy 1 on most boards).

A LiteRT interpreter is not thread-safe and holds its tensors in place, so each one serves one
request at a time: the session keeps a small pool (``InferenceOptions.litert_interpreters``) and a
request waits for a free interpreter. Dynamic dimensions (``shape_signature`` -1) are resized per
request when the shape changes.

Delegates: ``RuntimeSpec.execution_providers`` may name ``edgetpu`` (Coral: ``libedgetpu.so.1``) or
a delegate library path ending in ``.so``; a delegate that does not load is skipped with a log line
and the model runs on the CPU kernels (XNNPACK), like ONNX Runtime's CPU fallback.
"""

from __future__ import annotations

import ctypes
import logging
import queue
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError, ModelLoadError
from agent.protocol.messages import RuntimeSpec, TensorSpec
from agent.runtime.inference import InferenceOptions, SessionInfo, version_at_least
from agent.runtime.tensors import dtype_name

log = logging.getLogger(__name__)

DELEGATE_LIBRARIES: Mapping[str, str] = {"edgetpu": "libedgetpu.so.1"}
_SUPPORTED = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


def _interpreter_module() -> tuple[Any, str]:
    try:
        from ai_edge_litert import __version__ as version  # noqa: PLC0415
        from ai_edge_litert import interpreter  # noqa: PLC0415 - lazy by design
    except ImportError:
        try:
            from tflite_runtime import __version__ as version  # noqa: PLC0415
            from tflite_runtime import interpreter  # noqa: PLC0415
        except ImportError as exc:
            raise ModelLoadError(
                "no LiteRT runtime: install ai-edge-litert (pip install 'edgefleet[tflite]') or tflite-runtime"
            ) from exc
        return interpreter, f"tflite_runtime {version}"
    return interpreter, f"ai_edge_litert {version}"


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    dtype = dtype_name(detail["dtype"])
    if dtype not in _SUPPORTED:
        raise ModelLoadError(f"tensor {detail['name']!r} has type {dtype}, which the agent cannot serve")
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name=str(detail["name"]), dtype=dtype, shape=tuple(int(d) for d in shape))


class _Interpreter:
    """One interpreter with its tensor indices; used by one thread at a time (the pool sees to it)."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.input_index = {str(d["name"]): int(d["index"]) for d in interpreter.get_input_details()}
        self.output_index = [(str(d["name"]), int(d["index"])) for d in interpreter.get_output_details()]
        self.shapes = {str(d["name"]): tuple(int(x) for x in d["shape"]) for d in interpreter.get_input_details()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self.interpreter
        resized = False
        for name, array in feeds.items():
            if self.shapes[name] != array.shape:
                interp.resize_tensor_input(self.input_index[name], list(array.shape), strict=True)
                self.shapes[name] = array.shape
                resized = True
        if resized:
            interp.allocate_tensors()
        for name, array in feeds.items():
            interp.set_tensor(self.input_index[name], np.ascontiguousarray(array))
        interp.invoke()
        return {name: interp.get_tensor(index) for name, index in self.output_index}  # get_tensor copies


class LiteRtSession(SessionInfo):
    """A pool of LiteRT interpreters for one model behind the ``Session`` interface."""

    def __init__(self, pool: list[_Interpreter], backend: str, delegates: tuple[str, ...]) -> None:
        first = pool[0].interpreter
        inputs = tuple(_spec(d) for d in first.get_input_details())
        super().__init__(backend, (*delegates, "cpu"), inputs, tuple(_spec(d) for d in first.get_output_details()))
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        for item in pool:
            self._free.put(item)
        self._closed = False

    @classmethod
    def load(cls, path: Path, runtime: RuntimeSpec, options: InferenceOptions) -> LiteRtSession:
        module, backend = _interpreter_module()
        installed = backend.split()[-1]
        if not version_at_least(installed, runtime.min_version):
            raise ModelLoadError(f"model needs LiteRT >= {runtime.min_version}, this device has {backend}")
        threads = options.intra_op_threads or None
        pool: list[_Interpreter] = []
        delegate_names: tuple[str, ...] = ()
        for _ in range(options.litert_interpreters):
            delegates, delegate_names = _load_delegates(module, runtime.execution_providers)
            try:
                interp = module.Interpreter(
                    model_path=str(path), num_threads=threads, experimental_delegates=delegates or None
                )
                interp.allocate_tensors()
            except (ValueError, RuntimeError, OSError, MemoryError) as exc:
                raise ModelLoadError(f"LiteRT could not load {path.name}: {exc}") from exc
            pool.append(_Interpreter(interp))
        return cls(pool, backend, delegate_names)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise InferenceError("session is closed")
        worker = self._free.get()
        try:
            return worker.run(feeds)
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise InferenceError(f"LiteRT: {exc}") from exc
        finally:
            self._free.put(worker)

    def close(self) -> None:
        self._closed = True
        while True:  # drop the interpreters: LiteRT frees the model and its arena with them
            try:
                self._free.get_nowait()
            except queue.Empty:
                break


def _load_delegates(module: Any, requested: tuple[str, ...]) -> tuple[list[Any], tuple[str, ...]]:
    delegates: list[Any] = []
    names: list[str] = []
    for name in requested:
        library = DELEGATE_LIBRARIES.get(name.lower()) or (name if name.endswith(".so") or ".so." in name else None)
        if library is None:
            if name.lower() not in ("cpu", "xnnpack"):
                log.info("LiteRT has no delegate called %r; skipped", name)
            continue
        if not _library_present(library):
            log.warning("LiteRT delegate %s needs %s, which this device does not have; running on CPU", name, library)
            continue
        try:
            delegates.append(module.load_delegate(library))
            names.append(name)
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("LiteRT delegate %s (%s) did not load: %s; running on CPU", name, library, exc)
    return delegates, tuple(names)


def _library_present(library: str) -> bool:
    """Whether the dynamic loader can find ``library`` (checked first: a failed load_delegate leaves noise)."""
    if "/" in library:
        return Path(library).is_file()
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True
