"""Regenerate tests/vectors/envelope_v1.json and delta_v1.json (only when a format changes on purpose)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vectors import delta_v1  # noqa: E402
from tests.vectors.envelope_v1 import build  # noqa: E402


def main() -> int:
    out = ROOT / "tests" / "vectors" / "envelope_v1.json"
    out.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    out = ROOT / "tests" / "vectors" / "delta_v1.json"
    out.write_text(json.dumps(delta_v1.build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
