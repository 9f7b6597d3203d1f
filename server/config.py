"""Where the server keeps its state, and (grown by the control plane) its TOML configuration.

Layout under the server home (``--home``, ``$EDGEFLEET_HOME``, default ``~/.local/share/edgefleet``):

    registry.db      SQLite registry (WAL)
    models/          registered source models and their data sets, content-addressed
    builds/          compressed per-profile variants with provenance
    artifacts/       sealed (encrypted, chunked) artifacts, by artifact id
    keys/            the server signing key (0600)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("EDGEFLEET_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "edgefleet"


@dataclass(frozen=True)
class ServerPaths:
    home: Path

    @property
    def registry_db(self) -> Path:
        return self.home / "registry.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def builds_dir(self) -> Path:
        return self.home / "builds"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"
