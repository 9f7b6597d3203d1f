"""The models the arm64 scenario deploys, built on the host for ``raspberry-pi-5`` by the real pipeline.

``edgefleet model add`` + ``edgefleet build`` (server/compression, behind the accuracy gate) into a private
server home, then the builds are read from its catalog (``server.registry.catalog``), the source the
control plane deploys from:

* digits v1: built with the fp32 recipe only (the baseline the device starts on);
* digits v2: the same network, every recipe the profile allows: the best variant that passes the gate
  (int8 static QDQ on raspberry-pi-5), with golden cases the agent checks on the device;
* selfie v1: MediaPipe's selfie segmentation ``.tflite`` (LiteRT), gated on mask IoU.

The builds keep their real health specs (the profile's 200 ms latency budget and golden cases); the
scenario's deployments ask for a short probation window (``PROBATION_S``), a rollout policy, not a budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.models import real_model

PROFILE = "raspberry-pi-5"
REPO = Path(__file__).resolve().parents[2]
#: the scenario's probation window: long enough to sample, short enough for CI (a window, not a budget)
PROBATION_S = 4.0


@dataclass(frozen=True)
class Variants:
    digits_eval: tuple[np.ndarray, np.ndarray]  # pixels [N,1,8,8], labels [N]
    selfie_frames: np.ndarray  # [N,256,256,3]
    host_accuracy: dict[int, float]  # digits version -> accuracy on the host (x86_64)
    host_logits: dict[int, np.ndarray]
    host_selfie_mask: np.ndarray  # LiteRT on the host, first frame
    source: str
    variant_names: dict[tuple[str, int], str]


def _onnx_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)})[0])


def _litert_mask(path: Path, frame: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], frame[None].astype(np.float32))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def edgefleet(home: Path, *args: str) -> Any:
    """Run the operator CLI (``python -m server``, i.e. ``edgefleet``) against ``home``; its --json output, parsed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--home", str(home), *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))]
    return json.loads(lines[-1]) if lines else None


def build_variants(home: Path) -> Variants:
    """Register and build the three artifacts for ``raspberry-pi-5`` in the server home ``home`` (before the
    server starts: it deploys them from this catalog); host reference outputs of each."""
    from server.registry.catalog import Catalog  # noqa: PLC0415

    digits, selfie = real_model("digits"), real_model("selfie")
    fast = ("--profile", PROFILE, "--latency-runs", "3", "--no-pruning", "--no-fallback")
    digits_data = ("--calibration", str(digits.calibration), "--evaluation", str(digits.evaluation))
    for version, recipes in ((1, ("--recipe", "fp32")), (2, ())):
        edgefleet(home, "model", "add", str(digits.path), "--name", "digits", *digits_data)
        edgefleet(home, "build", f"digits:{version}", *fast, *recipes)
    selfie_data = ("--calibration", str(selfie.calibration), "--evaluation", str(selfie.evaluation))
    edgefleet(home, "model", "add", str(selfie.path), "--name", "selfie", "--metric", "iou", *selfie_data)
    edgefleet(home, "build", "selfie:1", *fast, "--recipe", "fp32")

    catalog = Catalog.open(home)
    names: dict[tuple[str, int], str] = {}
    paths: dict[tuple[str, int], Path] = {}
    try:
        for key in (("digits", 1), ("digits", 2), ("selfie", 1)):
            build = catalog.get_build(*key, PROFILE)
            if build is None:
                raise RuntimeError(f"the pipeline stored no {key[0]} v{key[1]} build for {PROFILE}")
            names[key], paths[key] = build.variant, Path(build.path)
    finally:
        catalog.close()
    if not names[("digits", 2)].startswith("int8"):
        raise RuntimeError(f"digits v2 for {PROFILE} is {names[('digits', 2)]}, not an int8 variant")

    evaluation = digits.load("evaluation")
    pixels, labels = evaluation["pixels"].astype(np.float32), evaluation["labels"]
    logits = {v: _onnx_logits(paths[("digits", v)], pixels) for v in (1, 2)}
    accuracy = {v: float((lg.argmax(1) == labels).mean()) for v, lg in logits.items()}
    frames = selfie.load("evaluation", limit=2)["input_1"].astype(np.float32)
    return Variants(
        digits_eval=(pixels, labels),
        selfie_frames=frames,
        host_accuracy=accuracy,
        host_logits=logits,
        host_selfie_mask=_litert_mask(paths[("selfie", 1)], frames[0]),
        source="edgefleet model add + edgefleet build (catalog)",
        variant_names=names,
    )
