"""Timed, printed steps: each prints ``[arm] NAME ... ok 12.3 s (detail)`` or FAIL with the reason."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    name: str
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Steps:
    done: list[Step] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        """Time the block; set ``info["detail"]`` inside it to print a result next to the time."""
        info: dict[str, str] = {"detail": ""}
        print(f"[arm] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            yield info
        except BaseException as exc:
            seconds = time.monotonic() - t0
            self.done.append(Step(name, seconds, ok=False, detail=f"{type(exc).__name__}: {exc}"))
            print(f"[arm] {name}: FAIL after {seconds:.1f} s: {exc}", file=sys.stderr, flush=True)
            raise
        seconds = time.monotonic() - t0
        self.done.append(Step(name, seconds, ok=True, detail=info["detail"]))
        extra = f"  ({info['detail']})" if info["detail"] else ""
        print(f"[arm] {name}: ok {seconds:.1f} s{extra}", file=sys.stderr, flush=True)

    def table(self) -> str:
        width = max([len(s.name) for s in self.done] + [4])
        lines = [f"{'step':<{width}}  {'result':<6}  {'seconds':>8}  detail"]
        for s in self.done:
            detail = s.detail.splitlines()[0] if s.detail else ""
            lines.append(f"{s.name:<{width}}  {'ok' if s.ok else 'FAIL':<6}  {s.seconds:>8.1f}  {detail}")
        lines.append(f"{'total':<{width}}  {'':<6}  {time.monotonic() - self.started:>8.1f}")
        return "\n".join(lines)

    def write_json(self, path: Path, **extra: object) -> None:
        data = {
            "steps": [
                {"name": s.name, "ok": s.ok, "seconds": round(s.seconds, 2), "detail": s.detail} for s in self.done
            ],
            "total_s": round(time.monotonic() - self.started, 1),
            **extra,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
