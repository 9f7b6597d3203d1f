"""The shared real models (``tests.support.models``) as the serving tests and benchmarks use them.

* digits: a small CNN trained on scikit-learn's digits, ``pixels`` float32[N,1,8,8] (0..1) -> ``logits`` [N,10],
  with a labelled evaluation split;
* selfie: MediaPipe's selfie segmentation (.tflite), ``input_1`` float32[1,256,256,3] -> ``activation_10``
  [1,256,256,1], with synthetic portraits.

Health specs here are what a server would put in the manifest for these models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.protocol.messages import HealthSpec, RuntimeSpec, TensorSpec
from tests.support.models import real_model

ONNX = RuntimeSpec(format="onnx", runtime="onnxruntime")
TFLITE = RuntimeSpec(format="tflite", runtime="litert")

DIGITS_HEALTH = HealthSpec(
    inputs=(TensorSpec("pixels", "float32", (1, 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", (-1, 10)),),
    latency_budget_ms=250.0,
    warmup_runs=3,
)
SELFIE_HEALTH = HealthSpec(
    inputs=(TensorSpec("input_1", "float32", (1, 256, 256, 3)),),
    outputs=(TensorSpec("activation_10", "float32", (1, 256, 256, 1)),),
    latency_budget_ms=2000.0,
    warmup_runs=2,
)


def digits_onnx() -> Path:
    return real_model("digits").path


def digits_eval(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [N,1,8,8] float32, labels [N]) of the evaluation split."""
    data = real_model("digits").load("evaluation", limit=limit)
    return data["pixels"], data["labels"]


def selfie_tflite() -> Path:
    return real_model("selfie").path


def selfie_frames(limit: int = 2) -> np.ndarray:
    data = real_model("selfie").load("evaluation", limit=limit)
    return data["input_1"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())
