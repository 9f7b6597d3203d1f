"""``edgefleet server run`` with its builds read from a JSON file (tests only).

    python -m tests.support.servers.main BUILDS_JSON edgefleet-args...

Runs the real command line (``server.cli.main``: config, logging, signals, the whole server)
with one addition: the builds listed in ``BUILDS_JSON`` (written by ``ServerProcess``; e.g. a
deliberately broken variant no compression pipeline would ship) are served first, and every
other model version comes from the compression pipeline's catalog of the home, as in
production. Everything else is the production path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agent.protocol.messages import HealthSpec, RuntimeSpec
from server.build_ops import default_build_source
from server.builds import Build, BuildLike, BuildSource, StaticBuilds


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


class LayeredBuilds:
    """The test's static builds where they name the model version, else the home's catalog."""

    def __init__(self, first: StaticBuilds, then: BuildSource) -> None:
        self.first, self.then = first, then

    def has_version(self, model: str, version: int) -> bool:
        return self.first.has_version(model, version) or self.then.has_version(model, version)

    def get_build(self, model: str, version: int, profile: str) -> BuildLike | None:
        if self.first.has_version(model, version):
            return self.first.get_build(model, version, profile)
        return self.then.get_build(model, version, profile)


def main(argv: list[str]) -> int:
    import server.app
    from server.cli import main as cli_main

    static = load_builds(Path(argv[0]))
    setattr(server.app, "default_build_source",  # noqa: B010 - the one substitution
            lambda home: LayeredBuilds(static, default_build_source(home)))
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
