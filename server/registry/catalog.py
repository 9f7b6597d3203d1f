"""The model catalog: registered models, their versions, and the per-profile builds.

Tables live in the registry database (``server.registry.db`` migrations named ``catalog_*``);
files live under the server home:

    models/<name>/<version>/model.onnx|model.tflite, calibration.npz, evaluation.npz
    builds/<name>/<version>/<profile>/<variant>.onnx|.tflite, provenance.json

Files are written to a staging directory (fsync'd) and renamed into place before the row that
names them is committed, so a crash leaves at worst an unreferenced staging directory, never a
row pointing at a half-written file. ``get_model_version`` and ``get_build`` are what the control
plane reads (``server.build_ops.CatalogBuilds``). Building is ``server.build_ops``: this module only
stores what a build chose (``store_build``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.files import fsync_dir
from agent.protocol.messages import HealthSpec, RuntimeSpec, TensorSpec
from server.builds import Build
from server.compression.data import load_dataset
from server.compression.gate import GateSpec
from server.compression.pipeline import ProfileResult, inspect_source
from server.config import ServerPaths, load_config, private_home
from server.errors import ConflictError, DatasetError, NotFoundError
from server.profiles import DeviceProfile
from server.refs import parse_ref
from server.registry.db import Migration, RegistryDatabase, open_database

MIGRATIONS: tuple[Migration, ...] = (
    (
        "catalog_001_models",
        """
CREATE TABLE catalog_models (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE catalog_versions (
    model TEXT NOT NULL REFERENCES catalog_models(name),
    version INTEGER NOT NULL,
    format TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    gate TEXT NOT NULL,
    calibration_path TEXT,
    calibration_sha256 TEXT,
    evaluation_path TEXT,
    evaluation_sha256 TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE catalog_builds (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    profile TEXT NOT NULL,
    variant TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    ota_size_bytes INTEGER NOT NULL,
    compression TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    runtime TEXT NOT NULL,
    health TEXT NOT NULL,
    provenance TEXT NOT NULL,
    built_at REAL NOT NULL,
    PRIMARY KEY (model, version, profile),
    FOREIGN KEY (model, version) REFERENCES catalog_versions(model, version)
)
""",
    ),
)



@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    format: str
    path: Path
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    gate: GateSpec
    calibration: Path | None
    calibration_sha256: str | None
    evaluation: Path | None
    evaluation_sha256: str | None
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"


@dataclass(frozen=True)
class CatalogBuild(Build):
    """A stored build: ``server.builds.Build`` plus its sizes and when it was made."""

    sha256: str = ""
    size_bytes: int = 0
    ota_size_bytes: int = 0
    built_at: float = 0.0


# -- files ---------------------------------------------------------------------------------------------


def _copy_synced(src: Path, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _write_synced(dst: Path, data: bytes) -> None:
    with dst.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Staging:
    """A directory filled and fsync'd next to its destination, then renamed into place."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.parent = parent
        self.dir = parent / f".staging-{uuid.uuid4().hex}"
        self.dir.mkdir()

    def commit(self, final: Path) -> None:
        fsync_dir(self.dir)
        if final.exists():
            old = final.with_name(f".old-{uuid.uuid4().hex}")
            final.rename(old)
            self.dir.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.dir.rename(final)
        fsync_dir(final.parent)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the catalog ----------------------------------------------------------------------------------------


def _specs(raw: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_dict(d) for d in json.loads(raw))


class Catalog:
    def __init__(self, db: RegistryDatabase, paths: ServerPaths) -> None:
        self.db = db
        self.paths = paths

    @classmethod
    def open(cls, home: Path) -> Catalog:
        paths = ServerPaths(private_home(Path(home)))
        catalog = cls(open_database(load_config(Path(home)).registry_url, paths.registry_db), paths)
        catalog.db.migrate(MIGRATIONS)
        return catalog

    def close(self) -> None:
        self.db.close()

    # -- models ------------------------------------------------------------------------------------

    def add_model(
        self,
        path: Path,
        name: str,
        *,
        calibration: Path | None = None,
        evaluation: Path | None = None,
        gate: GateSpec | None = None,
    ) -> ModelVersion:
        """Check the model and its data sets, copy them under the home, and register the next version."""
        parse_ref(name)
        source = inspect_source(Path(path))
        cal = load_dataset(calibration, source.inputs, role="calibration") if calibration else None
        ev = load_dataset(evaluation, source.inputs, role="evaluation") if evaluation else None
        if cal and ev and cal.sha256 == ev.sha256:
            raise DatasetError("evaluation data must be kept apart from calibration data (the files are identical)")
        if gate is None:
            gate = GateSpec(metric="accuracy" if ev is not None and ev.labels is not None else "cosine")
        if gate.metric == "accuracy" and (ev is None or ev.labels is None):
            raise DatasetError("--metric accuracy needs evaluation data with a 'labels' array")
        model_file = "model.tflite" if source.format == "tflite" else "model.onnx"
        parent = self.paths.models_dir / name
        staging = _Staging(parent)
        try:
            _copy_synced(source.path, staging.dir / model_file)
            if calibration:
                _copy_synced(calibration, staging.dir / "calibration.npz")
            if evaluation:
                _copy_synced(evaluation, staging.dir / "evaluation.npz")
            now = time.time()
            with self.db.transaction() as tx:
                tx.execute("INSERT INTO catalog_models (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                           (name, now))
                row = tx.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM catalog_versions WHERE model = ?",
                                 (name,)).fetchone()
                version = int(row[0])
                final = parent / str(version)
                if final.exists():
                    raise ConflictError(f"{final} exists but {name}:{version} is not registered; remove it")  # noqa: TRY301
                rel = Path("models") / name / str(version)
                tx.execute(
                    "INSERT INTO catalog_versions (model, version, format, path, sha256, size_bytes, inputs, outputs,"
                    " gate, calibration_path, calibration_sha256, evaluation_path, evaluation_sha256, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name, version, source.format, str(rel / model_file), source.sha256, source.size,
                        json.dumps([t.to_dict() for t in source.inputs]),
                        json.dumps([t.to_dict() for t in source.outputs]),
                        json.dumps(gate.to_dict()),
                        str(rel / "calibration.npz") if cal else None, cal.sha256 if cal else None,
                        str(rel / "evaluation.npz") if ev else None, ev.sha256 if ev else None,
                        now,
                    ),
                )
                staging.commit(final)
        except BaseException:
            staging.discard()
            raise
        mv = self.get_model_version(name, version)
        assert mv is not None
        return mv

    def _version_row(self, row: Mapping[str, Any]) -> ModelVersion:
        home = self.paths.home
        return ModelVersion(
            model=row["model"],
            version=int(row["version"]),
            format=row["format"],
            path=home / row["path"],
            sha256=row["sha256"],
            size_bytes=int(row["size_bytes"]),
            inputs=_specs(row["inputs"]),
            outputs=_specs(row["outputs"]),
            gate=GateSpec.from_dict(json.loads(row["gate"])),
            calibration=home / row["calibration_path"] if row["calibration_path"] else None,
            calibration_sha256=row["calibration_sha256"],
            evaluation=home / row["evaluation_path"] if row["evaluation_path"] else None,
            evaluation_sha256=row["evaluation_sha256"],
            created_at=float(row["created_at"]),
        )

    def get_model_version(self, model: str, version: int) -> ModelVersion | None:
        row = self.db.connection().execute(
            "SELECT * FROM catalog_versions WHERE model = ? AND version = ?", (model, version)
        ).fetchone()
        return self._version_row(row) if row else None

    def resolve(self, ref: str) -> ModelVersion:
        """``name:version`` or ``name`` (the latest version); NotFoundError when unknown."""
        name, version = parse_ref(ref)
        if version is None:
            row = self.db.connection().execute(
                "SELECT MAX(version) FROM catalog_versions WHERE model = ?", (name,)
            ).fetchone()
            if row is None or row[0] is None:
                raise NotFoundError(f"no model named {name!r} (see `edgefleet model list`)")
            version = int(row[0])
        mv = self.get_model_version(name, version)
        if mv is None:
            known = self.versions(name)
            hint = f"versions: {', '.join(str(v.version) for v in known)}" if known else "see `edgefleet model list`"
            raise NotFoundError(f"no model version {name}:{version} ({hint})")
        return mv

    def versions(self, model: str | None = None) -> list[ModelVersion]:
        if model is None:
            rows = self.db.connection().execute("SELECT * FROM catalog_versions ORDER BY model, version").fetchall()
        else:
            rows = self.db.connection().execute(
                "SELECT * FROM catalog_versions WHERE model = ? ORDER BY version", (model,)
            ).fetchall()
        return [self._version_row(r) for r in rows]

    # -- builds ------------------------------------------------------------------------------------

    def _build_row(self, row: Mapping[str, Any]) -> CatalogBuild:
        return CatalogBuild(
            model=row["model"],
            version=int(row["version"]),
            profile=row["profile"],
            variant=row["variant"],
            path=self.paths.home / row["path"],
            runtime=RuntimeSpec.from_dict(json.loads(row["runtime"])),
            health=HealthSpec.from_dict(json.loads(row["health"])),
            chunk_size=int(row["chunk_size"]),
            compression=row["compression"],
            provenance=json.loads(row["provenance"]),
            sha256=row["sha256"],
            size_bytes=int(row["size_bytes"]),
            ota_size_bytes=int(row["ota_size_bytes"]),
            built_at=float(row["built_at"]),
        )

    def get_build(self, model: str, version: int, profile: str) -> CatalogBuild | None:
        row = self.db.connection().execute(
            "SELECT * FROM catalog_builds WHERE model = ? AND version = ? AND profile = ?", (model, version, profile)
        ).fetchone()
        return self._build_row(row) if row else None

    def builds(self, model: str, version: int) -> list[CatalogBuild]:
        rows = self.db.connection().execute(
            "SELECT * FROM catalog_builds WHERE model = ? AND version = ? ORDER BY profile", (model, version)
        ).fetchall()
        return [self._build_row(r) for r in rows]

    def store_build(self, mv: ModelVersion, profile: DeviceProfile, result: ProfileResult) -> CatalogBuild:
        """Keep the variant ``result`` chose for ``profile`` (replacing an earlier build of it).

        The file and its provenance are staged (fsync'd) and renamed into place before the row
        naming them commits. Building is ``server.build_ops``; this only stores.
        """
        builds_dir = self.paths.builds_dir
        chosen = result.chosen
        assert chosen.path is not None
        ext = chosen.path.suffix
        parent = builds_dir / mv.model / str(mv.version)
        staging = _Staging(parent)
        try:
            _copy_synced(chosen.path, staging.dir / f"{chosen.recipe.name}{ext}")
            _write_synced(staging.dir / "provenance.json",
                          json.dumps(result.provenance, indent=2, sort_keys=True, default=str).encode())
            rel = Path("builds") / mv.model / str(mv.version) / profile.id / f"{chosen.recipe.name}{ext}"
            with self.db.transaction() as tx:
                tx.execute(
                    "INSERT INTO catalog_builds (model, version, profile, variant, path, sha256, size_bytes,"
                    " ota_size_bytes, compression, chunk_size, runtime, health, provenance, built_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (model, version, profile) DO UPDATE SET variant = excluded.variant,"
                    " path = excluded.path, sha256 = excluded.sha256, size_bytes = excluded.size_bytes,"
                    " ota_size_bytes = excluded.ota_size_bytes, compression = excluded.compression,"
                    " chunk_size = excluded.chunk_size, runtime = excluded.runtime, health = excluded.health,"
                    " provenance = excluded.provenance, built_at = excluded.built_at",
                    (
                        mv.model, mv.version, profile.id, chosen.recipe.name, str(rel), chosen.sha256,
                        chosen.size_bytes, result.ota_size, result.compression, profile.chunk_size,
                        json.dumps(result.runtime.to_dict()), json.dumps(result.health.to_dict()),
                        json.dumps(result.provenance, default=str), time.time(),
                    ),
                )
                staging.commit(parent / profile.id)
        except BaseException:
            staging.discard()
            raise
        stored = self.get_build(mv.model, mv.version, profile.id)
        assert stored is not None
        return stored
