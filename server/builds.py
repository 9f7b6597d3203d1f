"""What the control plane needs from the compression pipeline: one built variant per profile.

The rollout engine depends only on ``BuildSource``. ``server.build_ops.CatalogBuilds`` adapts the
catalog (``server.registry.catalog``); tests can pass any object with the same two methods. This
module imports neither, so it stays a leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.protocol.envelope import DEFAULT_CHUNK_SIZE
from agent.protocol.messages import HealthSpec, RuntimeSpec


@dataclass(frozen=True)
class Build:
    """One compressed variant of ``model`` version ``version`` built for ``profile``."""

    model: str
    version: int
    profile: str
    variant: str
    path: Path
    runtime: RuntimeSpec
    health: HealthSpec
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression: str = "lzma"
    provenance: Mapping[str, Any] = field(default_factory=dict)


class BuildLike(Protocol):
    """The fields of a build the control plane reads (the catalog's Build has them too)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def profile(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def runtime(self) -> RuntimeSpec: ...
    @property
    def health(self) -> HealthSpec: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def compression(self) -> str: ...


class BuildSource(Protocol):
    def has_version(self, model: str, version: int) -> bool:
        """Whether ``model`` version ``version`` is registered at all."""
        ...

    def get_build(self, model: str, version: int, profile: str) -> BuildLike | None:
        """The variant built for ``profile``, or None when there is none (yet)."""
        ...


class NoBuilds:
    """No builds at all: every deploy is refused with a clear message (tests of the control plane)."""

    def has_version(self, model: str, version: int) -> bool:
        return False

    def get_build(self, model: str, version: int, profile: str) -> BuildLike | None:
        return None


@dataclass
class StaticBuilds:
    """An in-memory build table: (model, version, profile) -> Build (tests, demos, the benchmark)."""

    builds: dict[tuple[str, int, str], Build] = field(default_factory=dict)

    def add(self, build: Build) -> Build:
        self.builds[(build.model, build.version, build.profile)] = build
        return build

    def has_version(self, model: str, version: int) -> bool:
        return any(m == model and v == version for m, v, _ in self.builds)

    def get_build(self, model: str, version: int, profile: str) -> Build | None:
        return self.builds.get((model, version, profile))
