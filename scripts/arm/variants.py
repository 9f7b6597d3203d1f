"""The models the arm64 scenario deploys, built on the host for the ``raspberry-pi-5`` profile.

* digits v1: the fetched fp32 ONNX classifier (the baseline the device starts on);
* digits v2: its int8 variant (QDQ, per-channel, static calibration on the model's calibration split) made by
  ONNX Runtime's quantizer, kept only if it passes an accuracy gate on the evaluation split;
* selfie v1: MediaPipe's selfie segmentation ``.tflite`` (LiteRT).

Each becomes a ``server.builds.Build`` in a ``StaticBuilds`` table, the interface the control plane reads from
the compression pipeline's catalog: the scenario asks ``get_build(model, version, "raspberry-pi-5")``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.messages import HealthSpec, RuntimeSpec, TensorSpec
from server.builds import Build, StaticBuilds
from tests.support.models import real_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE = "raspberry-pi-5"
REPO = Path(__file__).resolve().parents[2]
ONNX = RuntimeSpec(format="onnx", runtime="onnxruntime")
TFLITE = RuntimeSpec(format="tflite", runtime="litert")
#: the scenario's probation window: long enough to sample, short enough for CI (a window, not a budget)
PROBATION_S = 4.0
#: int8 may lose at most this much accuracy against fp32 on the evaluation split
INT8_MAX_DROP = 0.02


@dataclass(frozen=True)
class Variants:
    builds: StaticBuilds
    digits_eval: tuple[np.ndarray, np.ndarray]  # pixels [N,1,8,8], labels [N]
    selfie_frames: np.ndarray  # [N,256,256,3]
    host_accuracy: dict[int, float]  # digits version -> accuracy on the host (x86_64, same ONNX Runtime)
    host_logits: dict[int, np.ndarray]
    host_selfie_mask: np.ndarray  # LiteRT on the host, first frame
    source: str


def profile_budget_ms(profile: str = PROFILE) -> float:
    data = tomllib.loads((REPO / "firmware_profiles" / f"{profile}.toml").read_text())
    return float(data["latency_budget_ms"])


def _onnx_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)})[0])


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """Static int8 (QDQ, per-channel weights) with ONNX Runtime's quantizer, calibrated on real inputs."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._items = iter([{"pixels": calibration[i : i + 1].astype(np.float32)} for i in range(len(calibration))])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._items, None)

    logging.disable(logging.WARNING)  # the quantizer's advice about pre-processing, printed every time
    try:
        _quantize(quantize_static, src, dst, Reader(), QuantFormat.QDQ, QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return dst


def _quantize(quantize_static: Any, src: Path, dst: Path, reader: Any, fmt: Any, qtype: Any) -> None:
    quantize_static(
        str(src),
        str(dst),
        reader,
        quant_format=fmt,
        per_channel=True,
        activation_type=qtype,
        weight_type=qtype,
    )


def _litert_mask(path: Path, frame: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], frame[None].astype(np.float32))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def digits_health(budget_ms: float) -> HealthSpec:
    return HealthSpec(
        inputs=(TensorSpec("pixels", "float32", (1, 1, 8, 8)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        latency_budget_ms=budget_ms,
        probation_s=PROBATION_S,
        warmup_runs=3,
    )


def selfie_health(budget_ms: float) -> HealthSpec:
    return HealthSpec(
        inputs=(TensorSpec("input_1", "float32", (1, 256, 256, 3)),),
        outputs=(TensorSpec("activation_10", "float32", (1, 256, 256, 1)),),
        latency_budget_ms=budget_ms,
        probation_s=PROBATION_S,
        warmup_runs=2,
    )


def build_variants(work: Path) -> Variants:
    """Build (on the host) the three artifacts for ``raspberry-pi-5`` and their host reference outputs."""
    work.mkdir(parents=True, exist_ok=True)
    budget = profile_budget_ms()
    digits = real_model("digits")
    calibration = digits.load("calibration")["pixels"]
    evaluation = digits.load("evaluation")
    pixels, labels = evaluation["pixels"].astype(np.float32), evaluation["labels"]
    int8 = quantize_int8(digits.path, work / "digits-int8.onnx", calibration)

    logits = {1: _onnx_logits(digits.path, pixels), 2: _onnx_logits(int8, pixels)}
    accuracy = {v: float((lg.argmax(1) == labels).mean()) for v, lg in logits.items()}
    if accuracy[2] < accuracy[1] - INT8_MAX_DROP:
        raise RuntimeError(f"int8 accuracy {accuracy[2]:.3f} fails the gate (fp32 {accuracy[1]:.3f} - {INT8_MAX_DROP})")

    selfie = real_model("selfie")
    frames = selfie.load("evaluation", limit=2)["input_1"].astype(np.float32)
    mask = _litert_mask(selfie.path, frames[0])

    builds = StaticBuilds()
    builds.add(Build("digits", 1, PROFILE, "fp32", digits.path, ONNX, digits_health(budget), chunk_size=16 * 1024))
    builds.add(
        Build(
            "digits",
            2,
            PROFILE,
            "int8-qdq",
            int8,
            ONNX,
            digits_health(budget),
            chunk_size=16 * 1024,
            provenance={"quantizer": "onnxruntime.quantization.quantize_static", "accuracy": accuracy[2]},
        )
    )
    builds.add(Build("selfie", 1, PROFILE, "fp16", selfie.path, TFLITE, selfie_health(budget), chunk_size=64 * 1024))
    return Variants(
        builds=builds,
        digits_eval=(pixels, labels),
        selfie_frames=frames,
        host_accuracy=accuracy,
        host_logits=logits,
        host_selfie_mask=mask,
        source="StaticBuilds (onnxruntime quantize_static int8)",
    )
