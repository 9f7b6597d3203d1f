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


# -- module by module: every import statement of every source file, function-local ones included ----------

#: (package whose modules are checked, packages they must not import)
RULES = (
    ("agent.protocol", ("agent.core", "agent.runtime", "agent.cli", "agent.api", "server")),
    ("agent.core", ("agent.runtime", "agent.cli", "agent.api", "server")),
    ("agent", ("server",)),
    ("server", ("agent.runtime", "agent.cli", "agent.api")),
)


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names (relative imports resolved)."""
    import ast

    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _violations(package: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        for line, name in _imports(path, root):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def test_each_module_keeps_to_its_layer() -> None:
    """protocol <- core <- runtime inside the agent; the agent never reaches the server; the server never
    reaches the agent's runtime (it may use agent.protocol, agent.errors, agent.files and, in the simulator,
    agent.core)."""
    offenders = [v for package, forbidden in RULES for v in _violations(package, forbidden)]
    assert not offenders, offenders


def test_the_layering_check_sees_a_violation(tmp_path: Path) -> None:
    """The scanner itself: function-local and relative imports of the runtime inside core are caught."""
    core = tmp_path / "agent" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "probe.py").write_text(
        "def f():\n    from agent.runtime import store\n    return store\n\n\nfrom ..runtime import agent\n"
    )
    assert sorted(_violations("agent.core", ("agent.runtime",), root=tmp_path)) == [
        "agent/core/probe.py:2 imports agent.runtime",
        "agent/core/probe.py:2 imports agent.runtime.store",
        "agent/core/probe.py:6 imports agent.runtime",
        "agent/core/probe.py:6 imports agent.runtime.agent",
    ]
