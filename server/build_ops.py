"""Build orchestration: run the compression pipeline for a registered model version and hand the
chosen variant to the catalog to keep.

The catalog (``server.registry.catalog``) only stores models and builds; this module is what
builds. It imports both the pipeline and the catalog, and nothing imports it back except the
callers that start builds (``server.model_ops`` for the API, ``edgefleet build`` locally) and
the control plane's ``default_build_source``, so ``server.builds`` (the types the rollout engine
reads) stays a leaf and the old cycle ``server.builds`` <-> ``server.registry.catalog`` is gone.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from server.builds import BuildLike, BuildSource
from server.compression.data import SAMPLE, Dataset, load_dataset
from server.compression.pipeline import BuildOptions, ProfileResult, SourceModel, build_profile, inspect_source
from server.compression.share import BuildShare
from server.config import ServerPaths
from server.errors import RegistryError
from server.measured import measured_latency
from server.profiles import DeviceProfile
from server.registry.catalog import Catalog, CatalogBuild, ModelVersion
from server.registry.measurements import MeasurementRegistry


@contextlib.contextmanager
def build_share(paths: ServerPaths) -> Iterator[BuildShare]:
    """Work shared by the profiles of one build command; fp32 reference outputs also kept on disk."""
    with BuildShare.open(paths.builds_dir, paths.home / "cache" / "reference") as share:
        yield share


def build_variant(
    catalog: Catalog,
    mv: ModelVersion,
    profile: DeviceProfile,
    *,
    options: BuildOptions | None = None,
    progress: Callable[[str], None] | None = None,
    share: BuildShare | None = None,
) -> tuple[CatalogBuild, ProfileResult]:
    """Build ``mv`` for ``profile`` and store the chosen variant (replacing an earlier build).

    ``share`` (from ``build_share``): candidates and reference outputs kept across the profiles
    of one build command, so identical candidates are made and measured once.
    """
    source = inspect_source(mv.path)
    if source.sha256 != mv.sha256:
        raise RegistryError(f"{mv.path} no longer matches the registered digest of {mv.ref}")
    cal = load_dataset(mv.calibration, source.inputs, role="calibration") if mv.calibration else None
    ev = load_dataset(mv.evaluation, source.inputs, role="evaluation") if mv.evaluation else None
    opts = options or BuildOptions()
    if ev is None:
        # Without evaluation data nothing quantized can be gated: fp32 only, checked on synthetic inputs.
        ev = synthetic_dataset(source)
        opts = BuildOptions(**{**opts.__dict__, "only": ("fp32",), "pruning": False, "fallback": False,
                               "synthetic": True})
        cal = None
    if not opts.measured:  # what this version's variants measured on the profile's own devices, if anything
        rows = MeasurementRegistry(catalog.db).measurements(mv.model, mv.version, profile=profile.id)
        measured = measured_latency(rows, profile.id)
        if measured:
            opts = BuildOptions(**{**opts.__dict__, "measured": measured})
    older = catalog.get_build(mv.model, mv.version - 1, profile.id) if opts.previous is None else None
    if older is not None:  # delta-friendly quantization: start from the previous version's scales
        opts = BuildOptions(**{**opts.__dict__, "previous": older.path})
    catalog.paths.builds_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if share is None:  # a one-profile build still reads and writes the reference cache
            share = stack.enter_context(build_share(catalog.paths))
        return _build(catalog, mv, profile, source, ev, cal, opts, progress, share)


def _build(  # noqa: PLR0917
    catalog: Catalog,
    mv: ModelVersion,
    profile: DeviceProfile,
    source: SourceModel,
    ev: Dataset,
    cal: Dataset | None,
    opts: BuildOptions,
    progress: Callable[[str], None] | None,
    share: BuildShare,
) -> tuple[CatalogBuild, ProfileResult]:
    with tempfile.TemporaryDirectory(dir=catalog.paths.builds_dir, prefix=".work-") as work:
        result = build_profile(
            source, profile, mv.gate, evaluation=ev, calibration=cal, workdir=Path(work), options=opts,
            progress=progress, share=share,
        )
        if ev.source is None:
            checked = result.chosen.fidelity is not None
            result.provenance["notes"].append(
                "no evaluation data: only fp32 offered"
                + (" (checked on synthetic inputs)" if checked else " (not run: see the note above)"))
        # stored while the work directory (and the chosen file in it) still exists
        return catalog.store_build(mv, profile, result), result


def synthetic_dataset(source: SourceModel, samples: int = 8) -> Dataset:
    """Deterministic inputs for checking an fp32 graph optimization when no evaluation data was given.

    Per-sample layout: each sample is one feed shaped exactly like the input, fixed dimensions kept
    and symbolic ones 1, in the input's dtype (floats standard normal, integers 0 or 1), so inputs
    that are not batch-first, and scalars, are fed as the model declares them.
    """

    rng = np.random.default_rng(0)
    arrays = {}
    for spec in source.inputs:
        shape = (samples, *(d if d > 0 else 1 for d in spec.shape))
        kind = np.dtype(spec.dtype).kind
        arr = rng.standard_normal(shape) if kind == "f" else rng.integers(0, 2, shape)
        arrays[spec.name] = arr.astype(spec.dtype)
    return Dataset(arrays, layout=SAMPLE)


class CatalogBuilds:
    """The control plane's view of the catalog (``BuildSource``): registered versions and their builds."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def has_version(self, model: str, version: int) -> bool:
        return self.catalog.get_model_version(model, version) is not None

    def get_build(self, model: str, version: int, profile: str) -> BuildLike | None:
        return self.catalog.get_build(model, version, profile)


def default_build_source(home: Path) -> BuildSource:
    """The catalog of the server home."""
    return CatalogBuilds(Catalog.open(home))
