"""The gate: fidelity of a candidate against the fp32 model on evaluation data, and the selection rule.

Metrics (``GateSpec.metric``):

* ``accuracy``  top-1 accuracy against the labels; passes when the relative drop from fp32's
  accuracy is at most ``max_relative_drop`` (default 1 %).
* ``cosine``    per-sample cosine similarity of all outputs with fp32's; the *minimum* over the
  evaluation set must reach ``min_cosine`` (default 0.99).
* ``top1``      agreement of the predicted class of the first output with fp32's (default >= 0.99).
  The class axis is the *last* axis; every other axis after the sample axis is a position (time
  step, pixel, anchor), compared on its own: a ``(batch, time, classes)`` output agrees on the share
  of (sample, step) pairs whose arg-max matches. A last axis of size 1 (or a scalar per sample) is a
  binary decision: ``value > iou_threshold``.
* ``iou``       mean IoU of the first output thresholded at ``iou_threshold`` (maps, masks) with
  fp32's mask (default >= 0.97); per sample over all its elements, so any layout works.

``cosine`` compares each sample's outputs flattened and concatenated, so it too is layout-free.
Outputs arrive with the sample axis first and each sample's own shape after it
(``runners.run_dataset``); ``accuracy`` takes one label per sample (a single-position output)
or one label per position (labels shaped like the predicted classes).

Every candidate's report carries all of them plus the max absolute error, whatever the metric.
Selection: among the variants that pass (fidelity, size, latency budget), prefer those not slower
than fp32; among them, those within 10 % of the smallest over-the-air size; among those, the
highest fidelity, then the lowest latency. When nothing passes, fp32
is shipped; the best of the failures never is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from server.errors import DatasetError

METRICS = ("accuracy", "cosine", "top1", "iou")
#: A variant more than this much slower than fp32 (measured here, and by more than LATENCY_FLOOR_MS)
#: is not preferred over faster ones.
LATENCY_SLACK = 1.10
LATENCY_FLOOR_MS = 0.1
#: Passing variants within this factor of the smallest are ranked by fidelity, then latency.
SIZE_SLACK = 1.10
#: ``balanced`` on a profile whose latency is timed here (the build machine stands in for it): a candidate at
#: most BALANCED_SIZE_CAP times the smallest passing one's download and at most BALANCED_SPEEDUP times its
#: latency (a clear gain, well past run-to-run noise) is worth its bytes; of those, the smallest size x latency
BALANCED_SIZE_CAP = 1.5
#: 0.75, not 0.8: PP-OCRv4 rec's int8-dynamic measured 0.78-0.80x of fp16-weights' (fp32) time for 1.43x its
#: bytes, a gain inside the run-to-run spread that would flip the shipped variant between rebuilds
BALANCED_SPEEDUP = 0.75
#: ... and a candidate within SIZE_SLACK of that choice's download (the same size, to the size rule) wins at
#: BALANCED_NEAR_SPEEDUP times its latency: MediaPipe face_mesh's full int8 is 1.004x the bytes of its
#: fp32-compute int8 weights and 0.87-0.90x their time end to end (paired, with the float I/O copies), and the
#: size rule took the weights on fidelity (1.0000 against 0.9997, both far above the 0.99 gate). 0.93 keeps
#: clear of both that and the paired timing's spread for variants that run at fp32's speed (1.00-1.03x).
BALANCED_NEAR_SPEEDUP = 0.93


@dataclass(frozen=True)
class GateSpec:
    metric: str = "cosine"
    max_relative_drop: float = 0.01
    min_cosine: float = 0.99
    min_top1: float = 0.99
    min_iou: float = 0.97
    iou_threshold: float = 0.5
    max_abs_error: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise DatasetError(f"unknown metric {self.metric!r} (one of {', '.join(METRICS)})")
        for name in ("max_relative_drop", "min_cosine", "min_top1", "min_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DatasetError(f"gate threshold {name} must be within [0, 1], got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Fidelity:
    metric: str
    value: float  # in [0, 1], higher is better: accuracy, min cosine, top-1 agreement or mean IoU
    reference: float | None  # fp32's accuracy (accuracy metric only)
    min_cosine: float
    mean_cosine: float
    top1_agreement: float
    max_abs_error: float
    mean_iou: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


#: Float64 bytes of one row block of the cosine comparison: large outputs (a CTC recognizer's 64 x 40 x 6625)
#: are compared a few samples at a time instead of as whole float64 copies (hundreds of MB, page faults).
BLOCK_BYTES = 8 << 20


def _per_sample(outputs: Sequence[np.ndarray], start: int = 0, stop: int | None = None) -> np.ndarray:
    return np.concatenate([o[start:stop].reshape(len(o[start:stop]), -1).astype(np.float64) for o in outputs],
                          axis=1)


def _compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], n: int,
             finite: bool) -> tuple[np.ndarray, float]:
    """Per-sample cosine of all outputs (flattened, concatenated, float64) and the largest absolute error.

    Row blocks of at most BLOCK_BYTES: each sample's sums are the same whatever the block, so the
    values are those of comparing the whole arrays at once."""
    width = sum(int(np.prod(o.shape[1:], dtype=np.int64)) for o in reference)
    step = max(1, BLOCK_BYTES // max(1, 8 * width))
    cos = np.empty(n, dtype=np.float64)
    max_abs = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        ref, cand = _per_sample(reference, start, stop), _per_sample(candidate, start, stop)
        if not finite:
            cand = np.nan_to_num(cand, nan=0.0, posinf=0.0, neginf=0.0)
        dots = (ref * cand).sum(axis=1)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cos[start:stop] = np.where(norms > 0, dots / np.maximum(norms, 1e-30),
                                   np.where((ref == cand).all(axis=1), 1.0, 0.0))
        if finite and ref.size:
            max_abs = max(max_abs, float(np.abs(ref - cand).max()))
    return cos, max_abs if finite else math.inf


def _classes(out: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted class per (sample, position): arg-max over the last axis, or a threshold when it has one unit."""
    if out.ndim == 1 or out.shape[-1] == 1:
        decided: np.ndarray = (out.reshape(out.shape[0], -1) > threshold).astype(np.int64)
        return decided
    classes: np.ndarray = out.argmax(axis=-1).reshape(out.shape[0], -1)
    return classes


def _iou(ref: np.ndarray, cand: np.ndarray, threshold: float) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1) > threshold
    b = cand.reshape(cand.shape[0], -1) > threshold
    inter = (a & b).sum(axis=1)
    union = (a | b).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def measure_fidelity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], spec: GateSpec, labels: np.ndarray | None
) -> Fidelity:
    n = min(len(o) for o in (*reference, *candidate))
    finite = all(bool(np.isfinite(o[:n]).all()) for o in candidate if o.dtype.kind in "fc")
    cos, max_abs = _compare(reference, candidate, n, finite)
    first_ref, first_cand = reference[0][:n], candidate[0][:n]
    if first_ref.shape != first_cand.shape:
        raise DatasetError(f"the candidate's first output is {list(first_cand.shape[1:])} per sample, "
                           f"fp32's is {list(first_ref.shape[1:])}")
    ref_cls = _classes(first_ref, spec.iou_threshold)
    cand_cls = _classes(first_cand if finite else np.nan_to_num(first_cand), spec.iou_threshold)
    top1 = float((ref_cls == cand_cls).mean())
    accuracy = reference_acc = None
    mean_iou = None
    if labels is not None:
        lab = labels[:n].reshape(n, -1)
        if lab.shape != ref_cls.shape:
            raise DatasetError(f"'labels' give {lab.shape[1]} label(s) per sample; the first output predicts "
                               f"{ref_cls.shape[1]} class(es) per sample")
        accuracy = float((cand_cls == lab).mean())
        reference_acc = float((ref_cls == lab).mean())
    if spec.metric == "iou":
        mean_iou = float(_iou(first_ref, first_cand, spec.iou_threshold).mean())
    if not finite:
        cos = np.zeros_like(cos)
    values = {
        "accuracy": accuracy,
        "cosine": float(cos.min()),
        "top1": top1,
        "iou": mean_iou,
    }
    value = values[spec.metric]
    if value is None:
        raise DatasetError("the accuracy metric needs labels in the evaluation data ('labels' array)")
    return Fidelity(
        metric=spec.metric,
        value=float(value),
        reference=reference_acc if spec.metric == "accuracy" else None,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        top1_agreement=top1,
        max_abs_error=max_abs,
        mean_iou=mean_iou,
        accuracy=accuracy,
    )


def check_fidelity(fid: Fidelity, spec: GateSpec) -> str | None:
    """None when the candidate passes; otherwise why it does not."""
    if spec.max_abs_error is not None and not fid.max_abs_error <= spec.max_abs_error:
        return f"max abs error {fid.max_abs_error:.4g} > {spec.max_abs_error:.4g}"
    if spec.metric == "accuracy":
        ref = fid.reference or 0.0
        drop = (ref - fid.value) / ref if ref > 0 else 0.0
        if drop > spec.max_relative_drop + 1e-12:
            return (f"accuracy {fid.value:.4f} vs fp32 {ref:.4f}: {drop:.2%} relative drop > "
                    f"{spec.max_relative_drop:.2%}")
        return None
    floor = {"cosine": spec.min_cosine, "top1": spec.min_top1, "iou": spec.min_iou}[spec.metric]
    if not fid.value >= floor:
        return f"{spec.metric} {fid.value:.4f} < {floor:.4f}"
    return None


def shortfall(fid: Fidelity, spec: GateSpec) -> float:
    """How far the metric is below the gate's floor (<= 0: at or above it), in the metric's own units."""
    if spec.metric == "accuracy":
        return (fid.reference or 0.0) * (1.0 - spec.max_relative_drop) - fid.value
    floor = {"cosine": spec.min_cosine, "top1": spec.min_top1, "iou": spec.min_iou}[spec.metric]
    return floor - fid.value


@dataclass(frozen=True)
class Scored:
    """What the selection rule needs from a candidate."""

    name: str
    passed: bool
    ota_size: int
    latency_ms: float | None
    fidelity: float = 0.0
    #: Computes in fp32 like the fp32 build (``Recipe.fp32_compute``: fp32, ``fp16-weights``, pruned): its
    #: kernels are fp32's, so a slower timing is the machine's noise and never sets it aside.
    fp32_compute: bool = False


#: how the selection trades size against latency (``edgefleet build --optimize``)
OPTIMIZE_CHOICES = ("balanced", "latency", "size")
#: a measured variant slower than the measured fp32 by more than this (run-to-run noise on a board) is never chosen
MEASURED_SLACK = 1.05


def _slow(c: Scored, fp32_latency_ms: float | None) -> bool:
    """Slower than fp32 on this machine's estimate (never for a variant that computes in fp32)."""
    return (
        not c.fp32_compute
        and c.latency_ms is not None
        and fp32_latency_ms is not None
        and c.latency_ms > fp32_latency_ms * LATENCY_SLACK
        and c.latency_ms - fp32_latency_ms > LATENCY_FLOOR_MS
    )


def cannot_win(
    ota_size: int,
    passing: Sequence[Scored],
    fp32_latency_ms: float | None,
    *,
    optimize: str = "balanced",
    measured: Mapping[str, float] | None = None,
) -> Scored | None:
    """A passing candidate that ``select`` prefers to any candidate of ``ota_size`` bytes, whatever its
    fidelity and latency and whatever is measured later; None when there is none.

    Only for ``balanced`` and ``size`` without device measurements (the blind rule, size first): a
    passing candidate that is not slower than fp32 always stays in the running, and a candidate more
    than SIZE_SLACK larger than it is never within SIZE_SLACK of the smallest. ``balanced`` on a profile
    timed here may pay up to BALANCED_SIZE_CAP times the size rule's choice for speed, so there the bound is
    that much wider. Such a candidate need not be run on the evaluation data.
    """
    if optimize == "latency" or any(v is not None for v in (measured or {}).values()):
        return None
    fast = [c for c in passing if c.passed and not _slow(c, fp32_latency_ms)]
    best = min(fast, key=lambda c: c.ota_size, default=None)
    if best is None:
        return None
    timed_here = optimize == "balanced" and any(c.latency_ms is not None for c in fast)
    bound = best.ota_size * SIZE_SLACK * (BALANCED_SIZE_CAP if timed_here else 1.0)
    return best if ota_size > bound else None


def select(
    candidates: Sequence[Scored],
    fp32_latency_ms: float | None,
    *,
    optimize: str = "balanced",
    measured: Mapping[str, float] | None = None,
) -> Scored | None:
    """The best passing candidate, or None when none passes (the caller ships fp32, never a failure).

    ``measured``: per candidate name, the latency the profile's own devices measured (median p50). Where
    fp32 and a candidate are both measured, the measurement decides whether the candidate is slower than
    fp32, and one measured slower (by > MEASURED_SLACK) is never chosen. With two or more passing
    candidates measured, latency is compared on measurements only (a build machine's estimate is not
    comparable): ``latency`` takes the fastest; ``balanced`` the smallest among those within LATENCY_SLACK
    of the fastest; ``size`` the smallest (within SIZE_SLACK), then fidelity, then measured latency.
    Without measurements ``size`` is the blind rule (size first), ``latency`` takes the fastest estimate, and
    ``balanced`` takes the size rule's choice unless the build machine timed a candidate at most
    BALANCED_SIZE_CAP times its size and BALANCED_SPEEDUP times its latency, or within SIZE_SLACK of its
    size and BALANCED_NEAR_SPEEDUP times its latency (then the smallest size x latency of those): int8
    compute that is 0.6x as fast for 1.3x the bytes of an fp32-compute variant ships, and so does one 0.85x
    as fast for the same bytes. Where
    no latency was timed here (ARM, GPU profiles) it is the size rule.
    """
    if optimize not in OPTIMIZE_CHOICES:
        raise ValueError(f"optimize must be one of {', '.join(OPTIMIZE_CHOICES)}, not {optimize!r}")
    measured = {k: v for k, v in (measured or {}).items() if v is not None}
    fp32_measured = measured.get("fp32")
    passing = [c for c in candidates if c.passed
               and not (fp32_measured is not None and c.name in measured
                        and measured[c.name] > fp32_measured * MEASURED_SLACK)]
    if not passing:
        return None

    def slow(c: Scored) -> bool:
        if c.name in measured and fp32_measured is not None:
            return False  # judged on measurements above
        return _slow(c, fp32_latency_ms)

    fast = [c for c in passing if not slow(c)] or passing
    on_devices = [c for c in fast if c.name in measured]
    if len(on_devices) >= 2 and optimize != "size":
        fastest = min(measured[c.name] for c in on_devices)
        if optimize == "latency":
            return min(on_devices, key=lambda c: (measured[c.name], -c.fidelity, c.ota_size))
        near_fast = [c for c in on_devices if measured[c.name] <= fastest * LATENCY_SLACK]
        return min(near_fast, key=lambda c: (c.ota_size, -c.fidelity, measured[c.name]))

    def latency(c: Scored) -> tuple[int, float]:
        if len(on_devices) >= 2:
            return (0, measured[c.name]) if c.name in measured else (1, math.inf)
        return (0, c.latency_ms if c.latency_ms is not None else math.inf)

    if optimize == "latency":
        return min(fast, key=lambda c: (latency(c), -c.fidelity, c.ota_size))
    smallest = min(c.ota_size for c in fast)
    # sizes within SIZE_SLACK of the smallest count as equal: then the most faithful, then the fastest
    near = [c for c in fast if c.ota_size <= smallest * SIZE_SLACK]
    by_size = min(near, key=lambda c: (-c.fidelity, latency(c), c.ota_size))
    def timed(c: Scored) -> float | None:
        # a variant with fp32's kernels runs at fp32's speed: its own timing differs by the machine's noise only
        return fp32_latency_ms if c.fp32_compute and fp32_latency_ms is not None else c.latency_ms

    base = timed(by_size)
    if optimize == "size" or on_devices or base is None:
        return by_size
    def worth_its_bytes(c: Scored, t: float) -> bool:
        if c.ota_size <= by_size.ota_size * SIZE_SLACK:
            return t <= base * BALANCED_NEAR_SPEEDUP
        return c.ota_size <= by_size.ota_size * BALANCED_SIZE_CAP and t <= base * BALANCED_SPEEDUP

    worth = [c for c in fast if (t := timed(c)) is not None and worth_its_bytes(c, t)]
    if not worth:
        return by_size
    return min(worth, key=lambda c: (c.ota_size * (timed(c) or math.inf), -c.fidelity))
