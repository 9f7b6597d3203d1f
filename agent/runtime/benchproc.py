"""Time a model file in a child process at nice 19: a probe's benchmark, isolated from the serving process.

In the agent's own process a low-priority benchmark thread can still hold the interpreter lock when the
scheduler preempts it, and the serving threads then wait for it (priority inversion). A child process has its
own lock; at nice 19 the kernel lets the serving threads preempt it whenever they want the CPU.

    python -m agent.runtime.benchproc  < spec.json  > {"timings": [...], "providers": [...]} | {"error": "..."}

The spec: ``path``, ``runtime`` (RuntimeSpec), ``health`` (HealthSpec), ``options`` (InferenceOptions fields),
``runs``, ``max_s``, ``cpu_share``. The parent (``time_in_child``) bounds the child's wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.errors import EdgeError, HealthCheckError
from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec
from agent.runtime.inference import InferenceOptions

CHILD_NICE = 19
#: what the child may add to the benchmark's own wall-time cap: interpreter start, imports, loading the model
CHILD_SLACK_S = 120.0


def _options_dict(options: InferenceOptions) -> dict[str, Any]:
    d = dataclasses.asdict(options)
    d["cache_dir"] = str(options.cache_dir) if options.cache_dir is not None else None
    return d


def time_in_child(
    path: Path, runtime: RuntimeSpec, health: HealthSpec, *, options: InferenceOptions | None, runs: int,
    max_s: float, cpu_share: float,
) -> tuple[list[float], tuple[str, ...]]:
    """(sorted timings in ms, the execution providers that ran it); HealthCheckError when the child could not."""
    spec = {"path": str(path), "runtime": runtime.to_dict(), "health": health.to_dict(),
            "options": _options_dict(options or InferenceOptions()), "runs": runs, "max_s": max_s,
            "cpu_share": cpu_share}
    try:
        done = subprocess.run(  # this interpreter, a module of this package, a spec on stdin
            [sys.executable, "-m", "agent.runtime.benchproc"], input=json.dumps(spec).encode(), capture_output=True,
            timeout=max_s + CHILD_SLACK_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HealthCheckError(f"benchmark process: {exc}", check="load") from exc
    try:
        answer = json.loads(done.stdout.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = {}
    if "timings" not in answer:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise HealthCheckError(str(answer.get("error") or tail[0])[:300], check="load")
    return sorted(float(t) for t in answer["timings"]), tuple(str(p) for p in answer.get("providers", ()))


def _child() -> int:
    from agent.runtime.host import ModelHost  # noqa: PLC0415 - only the child loads a runtime

    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)
    spec = json.loads(sys.stdin.buffer.read())
    options = dict(spec["options"])
    options["cache_dir"] = Path(options["cache_dir"]) if options.get("cache_dir") else None
    try:
        with ModelHost(InferenceOptions(**options)) as host:
            runtime = RuntimeSpec.from_dict(spec["runtime"])
            model = host.load(Path(spec["path"]), ref=ModelRef("probe", 0), runtime=runtime)
            timings = host.benchmark(model, HealthSpec.from_dict(spec["health"]), runs=int(spec["runs"]),
                                     max_s=float(spec["max_s"]), cpu_share=float(spec["cpu_share"]))
            answer: dict[str, Any] = {"timings": timings, "providers": list(model.providers)}
    except EdgeError as exc:
        answer = {"error": exc.message}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
