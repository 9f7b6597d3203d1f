"""The models the agent lifecycle tests deploy: the real digits CNN and its misbehaving variants.

v1 is the fetched digits classifier (``tests.support.models``); the variants are made from it by
graph surgery (``tests.support.models.bad``): same inputs and output names, so each is a drop-in
"next version" that the agent must accept or roll back on its own merits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec, TensorSpec
from tests.support.models import bad as badmodels
from tests.support.models import real_model

ONNX = RuntimeSpec(format="onnx", runtime="onnxruntime")
NAME = "digits"


@dataclass(frozen=True)
class AgentModels:
    good: Path  # the real model (v1)
    good_v2: Path  # same outputs, different bytes
    nan: Path
    wrong_shape: Path
    slow: Path
    fails_on_real_data: Path
    input_name: str
    samples: np.ndarray  # real evaluation inputs
    labels: np.ndarray

    def bytes_of(self, which: str) -> bytes:
        return Path(getattr(self, which)).read_bytes()

    def health(self, *, probation_s: float = 1.0, latency_budget_ms: float = 50.0, min_requests: int = 0) -> HealthSpec:
        return digits_health(
            self.input_name, probation_s=probation_s, latency_budget_ms=latency_budget_ms, min_requests=min_requests
        )


def digits_health(
    input_name: str = "pixels", *, probation_s: float = 1.0, latency_budget_ms: float = 50.0, min_requests: int = 0
) -> HealthSpec:
    """The health spec the digits classifier ships with in these tests (one 8x8 image per probe)."""
    return HealthSpec(
        inputs=(TensorSpec(input_name, "float32", (1, 1, 8, 8)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        latency_budget_ms=latency_budget_ms,
        probation_s=probation_s,
        probation_min_requests=min_requests,
        max_error_rate=0.05,
        max_latency_regression=3.0,
        warmup_runs=3,
    )


def build(directory: Path) -> AgentModels:
    model = real_model("digits")
    directory.mkdir(parents=True, exist_ok=True)
    src = model.path
    data = model.load("evaluation", limit=64)
    labels = data.pop("labels")
    (input_name,) = data
    return AgentModels(
        good=src,
        good_v2=badmodels.identity_variant(src, directory / "v2.onnx"),
        nan=badmodels.nan_variant(src, directory / "nan.onnx"),
        wrong_shape=badmodels.wrong_shape_variant(src, directory / "shape.onnx"),
        slow=badmodels.slow_variant(src, directory / "slow.onnx", extra_ms=150.0),
        # real pixels are scaled to [0, 1] with saturated strokes at exactly 1.0; the warm-up probe
        # (uniform [0, 1), seed 0) peaks at 0.997: this threshold passes warm-up and fails real digits
        fails_on_real_data=badmodels.failing_on_real_data_variant(src, directory / "realdata.onnx", threshold=0.9995),
        input_name=input_name,
        samples=data[input_name].astype(np.float32),
        labels=labels,
    )


def ref(version: int) -> ModelRef:
    return ModelRef(NAME, version)
