"""Calibration and evaluation data sets: ``.npz`` files with one array per model input.

Two layouts, told apart by rank:

* **batch-first** (``batch``): each array has the input's rank and its first axis is the model's
  batch axis, which holds the samples (``x`` of ``[N, 3, 224, 224]`` for an input ``[-1, 3, 224, 224]``).
  Samples are run in batches.
* **per-sample** (``sample``): each array has one more axis than the input: ``[N, *input shape]``,
  so every sample is one whole feed, whatever the input layout (a recurrent state ``[2, batch, 128]``
  is ``[N, 2, 1, 128]``; a scalar input such as a sample rate is ``[N]``). Samples are run one at a time.
  Models with a scalar input, or an input whose batch axis is not first, need this layout.

All inputs use the same layout. An optional ``labels`` array (integers: one per sample, or one per
output position) turns on the accuracy gate. Files are capped in size, loaded without pickle, and checked against the
model's inputs (names, element kind, every fixed dimension) so a wrong file fails before any
quantizer sees it.

A small ``.npz`` can inflate to gigabytes (a 1 MB file to 1.3 GiB was seen), so ``check_npz``
reads the zip directory and each member's ``.npy`` header (a few hundred bytes inflated) first:
member count, names, declared uncompressed size, dtype (numbers only), rank, sample count and
that the header's shape x itemsize is exactly the member's size, all against the caps below.
Nothing is inflated beyond those headers until every member passed; ``zipfile`` then never
inflates more than a member's declared size.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from agent.files import file_sha256
from agent.protocol.messages import TensorSpec
from server.errors import DatasetError

MAX_DATASET_BYTES = 1 << 30
#: everything the arrays of one data set may take once inflated (declared sizes, summed)
MAX_INFLATED_BYTES = 512 << 20
MAX_MEMBERS = 64
MAX_RANK = 8
MAX_SAMPLES = 100_000
LABELS = "labels"
#: a .npy header is at most this long (numpy writes 64-byte-aligned headers of ~128 bytes)
_MAX_NPY_HEADER = 64 * 1024
BATCH = "batch"
SAMPLE = "sample"


@dataclass(frozen=True)
class Dataset:
    """Arrays by input name (leading sample axis), optional labels, and the file's SHA-256."""

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    sha256: str = ""
    source: Path | None = None
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)
    layout: str = BATCH

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def per_sample(self) -> bool:
        return self.layout == SAMPLE

    def take(self, n: int | None) -> Dataset:
        if n is None or n >= self.samples:
            return self
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset({k: v[:n] for k, v in self.arrays.items()}, labels, self.sha256, self.source,
                       layout=self.layout)

    def feed(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as one model feed (batch-first: a batch of one)."""
        if self.per_sample:
            return {k: np.asarray(v[index]) for k, v in self.arrays.items()}  # a scalar stays an ndarray
        return {k: v[index : index + 1] for k, v in self.arrays.items()}

    def first(self, size: int) -> dict[str, np.ndarray]:
        """One request: the first ``size`` samples batch-first, or the first sample per-sample."""
        if self.per_sample:
            return self.feed(0)
        return {k: v[:size] for k, v in self.arrays.items()}

    def batches(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch`` samples (batch-first), or one feed per sample (per-sample; ``batch`` unused)."""
        if self.per_sample:
            for i in range(self.samples):
                yield self.feed(i)
            return
        for start in range(0, self.samples, batch):
            yield {k: v[start : start + batch] for k, v in self.arrays.items()}


def _kind(dtype: str) -> str:
    return np.dtype(dtype).kind if dtype != "bool" else "b"


def load_dataset(path: Path, inputs: Sequence[TensorSpec], *, role: str = "evaluation") -> Dataset:
    """Load and validate ``path`` against the model ``inputs``; DatasetError says what is wrong."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"{role} data {path}: cannot read ({exc.strerror})") from exc
    if size > MAX_DATASET_BYTES:
        raise DatasetError(f"{role} data {path}: {size} bytes is over the {MAX_DATASET_BYTES}-byte limit")
    check_npz(path, role=role)
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{role} data {path}: not a readable .npz file ({exc})") from exc
    return validate_arrays(raw, inputs, role=role, sha256=file_sha256(path), source=path)


def check_npz(path: Path, *, role: str = "evaluation", max_inflated: int = MAX_INFLATED_BYTES) -> None:
    """Refuse ``path`` unless every member's declared size, dtype and shape fit the caps (DatasetError).

    Reads the zip's central directory and each member's .npy header only."""
    where = f"{role} data {path}"
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if not members or len(members) > MAX_MEMBERS:
                raise DatasetError(f"{where}: {len(members)} arrays (need 1..{MAX_MEMBERS})")
            for info in members:
                name = info.filename
                if not name.endswith(".npy") or "/" in name or info.is_dir():
                    raise DatasetError(f"{where}: member {name!r} is not an array (.npy at the top level)")
                total += info.file_size
                if total > max_inflated:
                    raise DatasetError(f"{where}: its arrays declare {total}+ bytes uncompressed, over the "
                                       f"{max_inflated}-byte limit (checked before inflating anything)")
                with zf.open(info) as member:
                    _check_npy_header(member, info.file_size, f"{where}: array {name[:-4]!r}")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{where}: not a readable .npz file ({exc})") from exc


def _check_npy_header(member: IO[bytes], file_size: int, where: str) -> None:
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise DatasetError(f"{where}: unknown .npy version {version}")
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _fortran, dtype = reader(member, max_header_size=_MAX_NPY_HEADER)
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise DatasetError(f"{where}: dtype {dtype} is not a plain number type")
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise DatasetError(f"{where}: shape {list(shape)} is not allowed (rank at most {MAX_RANK})")
    if shape and shape[0] > MAX_SAMPLES:
        raise DatasetError(f"{where}: {shape[0]} samples, over the {MAX_SAMPLES} limit")
    data = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    header = member.tell() if member.seekable() else None
    if header is not None and header + data != file_size:
        raise DatasetError(f"{where}: header says {list(shape)} {dtype} ({data} bytes) but the member holds "
                           f"{file_size - header} bytes")


def validate_arrays(
    raw: Mapping[str, np.ndarray],
    inputs: Sequence[TensorSpec],
    *,
    role: str = "evaluation",
    sha256: str = "",
    source: Path | None = None,
) -> Dataset:
    where = f"{role} data {source}" if source else f"{role} data"
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in raw]
    if missing:
        raise DatasetError(
            f"{where}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(sorted(raw)) or 'none'})"
        )
    arrays: dict[str, np.ndarray] = {}
    count: int | None = None
    layout = _layout(raw, inputs, where)
    for spec in inputs:
        arr = raw[spec.name]
        # per-sample: every axis of the input is checked; batch-first: all but the batch (sample) axis
        pairs = zip(spec.shape, arr.shape[1:], strict=True) if layout == SAMPLE else \
            zip(spec.shape[1:], arr.shape[1:], strict=True)
        for axis, (want, got) in enumerate(pairs, start=1):
            if want > 0 and want != got:
                raise DatasetError(
                    f"{where}: input {spec.name!r} has shape {list(arr.shape)}, the model expects "
                    f"{_expected(spec.shape, layout)} (axis {axis} is {got}, not {want})"
                )
        want_kind, got_kind = _kind(spec.dtype), arr.dtype.kind
        if (want_kind == "f" and got_kind not in "fiu") or (want_kind in "iu" and got_kind not in "iu"):
            raise DatasetError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
        if want_kind == "f" and not np.isfinite(arr).all():
            raise DatasetError(f"{where}: input {spec.name!r} contains NaN or infinity")
        n = arr.shape[0]
        if n == 0 or n > MAX_SAMPLES:
            raise DatasetError(f"{where}: input {spec.name!r} has {n} samples (need 1..{MAX_SAMPLES})")
        if count is not None and n != count:
            raise DatasetError(f"{where}: inputs disagree on the number of samples ({count} vs {n})")
        count = n
        arrays[spec.name] = np.ascontiguousarray(arr.astype(spec.dtype, copy=False))
    labels = raw.get(LABELS)
    if labels is not None and (labels.ndim < 1 or labels.dtype.kind not in "iu" or len(labels) != count):
        raise DatasetError(f"{where}: 'labels' must be integers, one (or one per output position) per sample "
                           f"({count}), got {labels.dtype} {list(labels.shape)}")
    extra = {k: v for k, v in raw.items() if k not in arrays and k != LABELS}
    return Dataset(arrays, labels, sha256, source, extra, layout)


def _expected(shape: Sequence[int], layout: str) -> str:
    dims = ["N", *("?" if d < 0 else str(d) for d in shape)] if layout == SAMPLE else \
        ["N", *("?" if d < 0 else str(d) for d in shape[1:])]
    return f"[{', '.join(dims)}] ({'per-sample' if layout == SAMPLE else 'batch-first'} layout)"


def _layout(raw: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], where: str) -> str:
    """``batch`` when every array has its input's rank, ``sample`` when every one has one more."""
    layouts: dict[str, str] = {}
    for spec in inputs:
        rank, got = len(spec.shape), raw[spec.name].ndim
        if got == rank + 1:
            layouts[spec.name] = SAMPLE
        elif got == rank and rank > 0:
            layouts[spec.name] = BATCH
        else:
            raise DatasetError(
                f"{where}: input {spec.name!r} has shape {list(raw[spec.name].shape)}; the model expects "
                f"{list(spec.shape)}: give {_expected(spec.shape, SAMPLE)}"
                + (f" or {_expected(spec.shape, BATCH)}" if rank > 0 else "")
            )
    if len(set(layouts.values())) > 1:
        per = ", ".join(f"{k}: {v}" for k, v in layouts.items())
        raise DatasetError(f"{where}: the arrays mix layouts ({per}); give every input per-sample "
                           "([N, *input shape]) or every input batch-first")
    return next(iter(layouts.values()), BATCH)
