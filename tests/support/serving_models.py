"""Real models for the serving tests and benchmarks, in one place.

* ``digits_onnx(dir)``: a digits classifier (MLP trained on scikit-learn's digits), ``input`` float32[N,64]
  (pixels 0..16) -> ``logits``/``probabilities`` [N,10]; with its labelled test split.
* ``selfie_tflite()``: MediaPipe's selfie segmentation (.tflite, from the mediapipe wheel),
  ``input_1`` float32[1,256,256,3] -> ``activation_10`` [1,256,256,1].

Files are cached under ``${EDGEFLEET_CACHE:-~/.cache/edgefleet}/serving``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from agent.protocol.messages import HealthSpec, RuntimeSpec, TensorSpec
from tests.support.localmodels import write_digits_onnx

MEDIAPIPE = "mediapipe==0.10.14"
SELFIE_MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"

ONNX = RuntimeSpec(format="onnx", runtime="onnxruntime")
TFLITE = RuntimeSpec(format="tflite", runtime="litert")

DIGITS_HEALTH = HealthSpec(
    inputs=(TensorSpec("input", "float32", (1, 64)),),
    outputs=(TensorSpec("logits", "float32", (-1, 10)), TensorSpec("probabilities", "float32", (-1, 10))),
    latency_budget_ms=250.0,
    warmup_runs=3,
)
SELFIE_HEALTH = HealthSpec(
    inputs=(TensorSpec("input_1", "float32", (1, 256, 256, 3)),),
    outputs=(TensorSpec("activation_10", "float32", (1, 256, 256, 1)),),
    latency_budget_ms=2000.0,
    warmup_runs=2,
)


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGEFLEET_CACHE") or Path.home() / ".cache" / "edgefleet")
    path = root / "serving"
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_onnx(seed: int = 0) -> Path:
    return write_digits_onnx(cache_dir() / f"digits-mlp-seed{seed}.onnx", seed=seed)


def selfie_tflite() -> Path:
    """The selfie segmentation model, taken from the mediapipe wheel (downloaded, never installed)."""
    target = cache_dir() / "selfie_segmentation.tflite"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, MEDIAPIPE],
            check=True,
            timeout=600,
        )
        wheel = next(Path(tmp).glob("mediapipe-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(SELFIE_MEMBER)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target
