"""The real models that tests and benchmarks use, as fetched by ``scripts/fetch_models.py``.

    from tests.support.models import real_model
    m = real_model("minilm")          # RealModel(path=..., calibration=..., evaluation=..., inputs=..., ...)

A missing or stale cache is an error that says how to fix it (``scripts/setup``), never a skip:
the tests exist to run on real models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.messages import TensorSpec

NAMES = ("minilm", "ppocr_det", "digits", "selfie", "face_det", "face_mesh", "vad", "ppocr_rec")


class ModelCacheMissing(RuntimeError):
    """The model cache lacks a model: run scripts/setup (or scripts/fetch_models.py)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE") or "~/.cache/edgefleet").expanduser() / "models"


@dataclass(frozen=True)
class RealModel:
    name: str
    path: Path  # model.onnx or model.tflite
    calibration: Path  # npz: arrays keyed by input name (leading sample axis), + "labels" if labelled
    evaluation: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str  # classification | embedding | detection | segmentation | landmarks | voice-activity | text-recognition
    metric: str  # the fidelity metric that suits the task: accuracy | cosine | iou | top1
    labelled: bool
    meta: dict[str, Any]

    @property
    def format(self) -> str:
        return "tflite" if self.path.suffix == ".tflite" else "onnx"

    def load(self, split: str = "evaluation", limit: int | None = None) -> dict[str, np.ndarray]:
        """The arrays of one split, optionally only the first ``limit`` samples (small CI subsets)."""
        with np.load(self.calibration if split == "calibration" else self.evaluation) as data:
            return {k: (data[k][:limit] if limit is not None else data[k]) for k in data.files}


def real_model(name: str) -> RealModel:
    if name not in NAMES:
        raise ValueError(f"unknown real model {name!r} (one of {', '.join(NAMES)})")
    folder = cache_dir() / name
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ModelCacheMissing(
            f"real model {name!r} is not in the cache {cache_dir()}: run scripts/setup "
            "(or .venv/bin/python scripts/fetch_models.py) first"
        )
    meta = json.loads(meta_path.read_text())
    files = [folder / meta["model_file"], folder / "calibration.npz", folder / "evaluation.npz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelCacheMissing(f"model cache for {name!r} is incomplete ({', '.join(missing)}): run scripts/setup")
    return RealModel(
        name=name,
        path=files[0],
        calibration=files[1],
        evaluation=files[2],
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in meta["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in meta["outputs"]),
        task=meta["task"],
        metric=meta["metric"],
        labelled=bool(meta.get("labelled")),
        meta=meta,
    )
