"""Work shared by the profiles of one build: identical candidates are made and measured once.

``edgefleet build --profile all`` builds one model for several profiles. Most of the work does not
depend on the profile: the fp32 reference outputs, the opset-fitted and pre-processed model, and
every candidate whose recipe and parameters are the same (``int8-static-minmax`` with S8S8 is the
same file for the Raspberry Pis and the VNNI x86). A ``BuildShare`` keeps them for the length of
one build command; each profile then applies only its own checks (opset, ops, size and latency
limits, the gate's verdict) to the shared measurements.

The fp32 reference outputs are also kept on disk (``<home>/cache/reference/``), keyed by the
model's digest, the evaluation data's digest, the sample count and the runtime versions, so a
rebuild of the same model version skips them.

    with BuildShare.open(home / "builds") as share:
        for profile in profiles:
            build_profile(..., share=share)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.compression import codec
from server.compression.gate import Fidelity

log = logging.getLogger(__name__)

#: Reference files larger than this are not kept on disk (an embedding model over a big set).
MAX_REFERENCE_BYTES = 512 << 20


@dataclass
class Measured:
    """What making and running one candidate gave, before any profile's checks."""

    path: Path | None = None
    error: str | None = None
    fidelity: Fidelity | None = None
    size: int = 0
    estimate: int = 0
    sha256: str = ""
    opset: int | None = None
    ops: frozenset[tuple[str, str]] = frozenset()
    latency: float | None = None
    best: float | None = None
    build_s: float = 0.0
    notes: tuple[str, ...] = ()
    #: run on the evaluation data (fidelity measured, or the run's error): a made candidate that no
    #: profile can choose is never run (``gate.cannot_win``)
    evaluated: bool = False


@dataclass
class Prepared:
    """The opset-fitted fp32 model and the quantizers' pre-processed input, with the notes made."""

    base: Path
    pre: Path
    notes: list[str] = field(default_factory=list)


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class BuildShare:
    def __init__(self, workdir: Path, reference_dir: Path | None = None) -> None:
        self.dir = workdir
        self.reference_dir = reference_dir
        self.measured: dict[str, Measured] = {}
        self.prepared: dict[str, Prepared] = {}
        self.references: dict[str, list[np.ndarray] | str] = {}
        self.rankings: dict[str, list[str]] = {}
        self.by_sha: dict[str, Measured] = {}  # identical files made by different recipes: measured once
        self.retimed: dict[tuple[str, str], Any] = {}  # (candidate, fp32) sha256: retime.PairedTiming
        self.codecs: dict[str, codec.CodecChoice] = {}  # by the chosen file's sha256: lzma runs once per file
        self.hits = 0

    @classmethod
    @contextmanager
    def open(cls, parent: Path, reference_dir: Path | None = None) -> Iterator[BuildShare]:
        """A share whose files live in a temporary directory under ``parent`` until the block ends."""
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=parent, prefix=".share-"))
        try:
            yield cls(work, reference_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def folder(self, key: str) -> Path:
        path = self.dir / key[:24]
        path.mkdir(exist_ok=True)
        return path

    def codec_choice(self, data: bytes) -> codec.CodecChoice:
        """``codec.choose_codec`` of the file, once per content: profiles that ship the same file share it."""
        key = hashlib.sha256(data).hexdigest()
        choice = self.codecs.get(key)
        if choice is None:
            choice = self.codecs[key] = codec.choose_codec(data)
        return choice

    # -- reference outputs ---------------------------------------------------------------------

    def _reference_file(self, key: str) -> Path | None:
        return self.reference_dir / f"{key}.npz" if self.reference_dir is not None else None

    def reference(self, key: str) -> list[np.ndarray] | str | None:
        """The fp32 outputs (or why fp32 could not run) for ``key``: memory first, then disk."""
        if key in self.references:
            return self.references[key]
        path = self._reference_file(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                outs = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        except (OSError, ValueError, KeyError) as exc:
            log.info("reference cache %s unreadable (%s): recomputing", path, exc)
            return None
        self.references[key] = outs
        return outs

    def put_reference(self, key: str, outputs: Sequence[np.ndarray] | str, *, persist: bool) -> None:
        self.references[key] = outputs if isinstance(outputs, str) else list(outputs)
        path = self._reference_file(key)
        if not persist or path is None or isinstance(outputs, str):
            return
        if sum(o.nbytes for o in outputs) > MAX_REFERENCE_BYTES:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.savez(f, *outputs)
        tmp.replace(path)
