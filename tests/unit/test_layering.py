"""Dependencies point one way: the agent never loads server code or heavy libraries at import time.

Runs in a fresh interpreter so nothing the test session imported can hide a violation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, json, pkgutil, sys
import agent
names = ["agent"] + [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")
                     if not m.name.endswith("__main__")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
print(json.dumps({"modules": names, "failed": failed, "loaded": sorted(sys.modules)}))
"""

PURE_PROBE = r"""
import importlib, json, pkgutil, sys
import agent.protocol, agent.core
names = []
for pkg in (agent.protocol, agent.core):
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""

FORBIDDEN_FOR_AGENT = (
    "server",
    "onnx",
    "onnxruntime",
    "torch",
    "tensorflow",
    "sklearn",
    "ai_edge_litert",
    "tflite_runtime",
    "rich",
)


def _run(probe: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _top_level(loaded: object) -> set[str]:
    assert isinstance(loaded, list)
    return {name.split(".")[0] for name in loaded}


def test_every_agent_module_imports_without_server_or_heavy_libraries() -> None:
    result = _run(PROBE)
    assert not result["failed"], result["failed"]
    assert len(result["modules"]) >= 5  # type: ignore[arg-type]
    leaked = _top_level(result["loaded"]) & set(FORBIDDEN_FOR_AGENT)
    assert not leaked, f"importing agent/ pulled in {sorted(leaked)}"


def test_protocol_and_core_are_pure() -> None:
    result = _run(PURE_PROBE)
    leaked = _top_level(result["loaded"]) & {"paho", "numpy", "psutil", "onnxruntime", "server"}
    assert not leaked, f"agent.protocol/agent.core pulled in {sorted(leaked)}"


def test_no_agent_source_mentions_the_server_package() -> None:
    offenders = []
    for path in (ROOT / "agent").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import server", "from server")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders, offenders
