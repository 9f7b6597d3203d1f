"""In-process inference for applications on the device: a thin facade over ``ModelHost``.

Two ways to get a handle:

* next to a running agent in the same process, on the host the agent swaps models in::

      model = LocalModel(agent.host)           # follows every hot swap and rollback
      probabilities = model.infer({"input": pixels})["probabilities"]

* standalone, on one model file (no agent, no MQTT), e.g. to try a model on the board::

      with LocalModel.open("digits.onnx", threads=2) as model:
          logits = model(pixels)["logits"]     # one-input models take the array itself

``infer`` accepts numpy arrays or anything ``np.asarray`` takes, and casts within a kind
(float64 -> float32, int32 -> int64) so Python numbers just work; a cast that would lose meaning
(float -> int) raises ``InvalidInputError``. Errors are the agent's: ``InvalidInputError`` (your
tensors do not fit), ``InferenceError`` (the runtime failed), ``ModelNotReadyError`` (nothing is
serving yet: see ``wait_ready``). Out-of-process applications use the HTTP API instead
(``agent.runtime.http``, the Open Inference Protocol on 127.0.0.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.serving import HealthReport, ServingStats
from agent.errors import InvalidInputError, ModelLoadError, ModelNotReadyError
from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec, TensorSpec
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.inference import InferenceOptions
from agent.runtime.tensors import numpy_dtype

__all__ = ["LocalModel", "open_model", "runtime_for"]


def runtime_for(path: Path, execution_providers: Sequence[str] = ()) -> RuntimeSpec:
    """The runtime a model file needs, from its suffix (``.onnx`` -> ONNX Runtime, ``.tflite`` -> LiteRT)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return RuntimeSpec(format="onnx", runtime="onnxruntime", execution_providers=tuple(execution_providers))
    if suffix == ".tflite":
        return RuntimeSpec(format="tflite", runtime="litert", execution_providers=tuple(execution_providers))
    raise ModelLoadError(f"cannot tell the runtime of {Path(path).name}: expected a .onnx or .tflite file")


class LocalModel:
    """Whatever model the host is serving, callable with numpy arrays."""

    def __init__(self, host: ModelHost, *, owns_host: bool = False) -> None:
        self.host = host
        self._owns_host = owns_host

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        version: int = 1,
        execution_providers: Sequence[str] = (),
        threads: int = 0,
        health: HealthSpec | None = None,
    ) -> LocalModel:
        """Load one model file and serve it in this process; raises ModelLoadError / HealthCheckError.

        ``threads``: intra-op threads (0 = runtime default). ``health``: run the agent's health check
        (warm-up, finite outputs, latency budget, golden outputs) before serving it.
        """
        path = Path(path)
        host = ModelHost(InferenceOptions(intra_op_threads=threads))
        try:
            model = host.load(
                path, ref=ModelRef(name or path.stem, version), runtime=runtime_for(path, execution_providers)
            )
            if health is not None:
                host.check(model, health)
            host.activate(model)
        except BaseException:
            host.close()
            raise
        return cls(host, owns_host=True)

    # -- inference ---------------------------------------------------------------------------------

    def infer(self, inputs: Mapping[str, Any] | Any) -> dict[str, np.ndarray]:
        """Run the served model once. A mapping names the inputs; a bare array feeds a one-input model."""
        model = self._model()
        return self.host.infer(_feeds(model.inputs, inputs))

    __call__ = infer

    # -- what is served ----------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        """The model serving right now (it may change with the next hot swap)."""
        return self.host.active

    @property
    def ref(self) -> ModelRef | None:
        model = self.host.active
        return model.ref if model is not None else None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._model().inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._model().outputs

    def ready(self) -> bool:
        return self.host.active is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until some model is serving (after start-up or a deploy); False on timeout."""
        return self.host.wait_active(timeout) is not None

    def check(self, health: HealthSpec) -> HealthReport:
        """Run the health check against the model being served (a self-test for the application)."""
        return self.host.check(self._model(), health)

    def stats(self, *, since: float | None = None) -> ServingStats:
        """Requests, errors and latency percentiles of the served version (``since`` in ``host.now()`` time)."""
        model = self._model()
        return self.host.stats(since=since, version=model.ref.version, name=model.ref.name)

    def close(self) -> None:
        """Release the model if this handle loaded it (``open``); a handle on an agent's host leaves it be."""
        if self._owns_host:
            self.host.close()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model(self) -> LoadedModel:
        model = self.host.active
        if model is None:
            raise ModelNotReadyError("no model is being served yet")
        return model


open_model = LocalModel.open


def _feeds(specs: Sequence[TensorSpec], inputs: Mapping[str, Any] | Any) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise InvalidInputError(f"the model has {len(specs)} inputs ({names}): pass a mapping of name -> array")
        inputs = {specs[0].name: inputs}
    declared = {s.name: s for s in specs}
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = declared.get(name)
        array = np.asarray(value)
        if spec is not None:
            want = numpy_dtype(spec.dtype).newbyteorder("=")
            if array.dtype != want:
                if not np.can_cast(array.dtype, want, casting="same_kind"):
                    raise InvalidInputError(
                        f"input {name!r} is {array.dtype}, the model takes {spec.dtype}: refusing a lossy cast",
                        tensor=name,
                    )
                array = array.astype(want)
        feeds[name] = array
    return feeds
