"""Importing the serving modules must not import a runtime, onnx, the server or training libraries."""

from __future__ import annotations

import json
import subprocess
import sys

SERVING_MODULES = [
    "agent.api",
    "agent.core.serving",
    "agent.runtime.host",
    "agent.runtime.http",
    "agent.runtime.oip",
    "agent.runtime.tensors",
    "agent.runtime.inference",
    "agent.runtime.inference.onnxrt",
    "agent.runtime.inference.litert",
]
FORBIDDEN = ["onnxruntime", "ai_edge_litert", "tflite_runtime", "onnx", "server", "torch", "sklearn", "rich"]


def test_serving_modules_import_no_runtime() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in {FORBIDDEN!r} if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []
