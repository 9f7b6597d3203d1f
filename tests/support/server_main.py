"""``edgefleet server run`` with its builds read from a JSON file (tests only).

    python -m tests.support.server_main BUILDS_JSON edgefleet-args...

Runs the real command line (``server.cli.main``: config, logging, signals, the whole server)
with one substitution: the build source is a ``StaticBuilds`` loaded from ``BUILDS_JSON``
(written by ``tests.support.server_process.write_builds``) instead of the compression
pipeline's catalog. Everything else is the production path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agent.protocol.messages import HealthSpec, RuntimeSpec
from server.builds import Build, StaticBuilds


def load_builds(path: Path) -> StaticBuilds:
    builds = StaticBuilds()
    for row in json.loads(path.read_text()):
        builds.add(Build(model=row["model"], version=int(row["version"]), profile=row["profile"],
                         variant=row["variant"], path=Path(row["path"]), runtime=RuntimeSpec.from_dict(row["runtime"]),
                         health=HealthSpec.from_dict(row["health"]), chunk_size=int(row["chunk_size"]),
                         compression=row["compression"]))
    return builds


def build_row(build: Build) -> dict[str, Any]:
    return {"model": build.model, "version": build.version, "profile": build.profile, "variant": build.variant,
            "path": str(build.path), "runtime": build.runtime.to_dict(), "health": build.health.to_dict(),
            "chunk_size": build.chunk_size, "compression": build.compression}


def main(argv: list[str]) -> int:
    import server.app
    from server.cli import main as cli_main

    builds = load_builds(Path(argv[0]))
    setattr(server.app, "default_build_source", lambda home: builds)  # noqa: B010 - the one substitution
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
