"""NNCF post-training quantization of ONNX models: a peer measured in the benchmark, and the
``int8-nncf`` / ``int8-nncf-ac`` recipes where it beats ONNX Runtime's quantizer.

* ``quantize``: ``nncf.quantize`` (symmetric per-channel int8 weights, int8 activations placed by
  NNCF's own patterns, fast bias correction). Weights stored as int8 when they are initializers, so
  the caller feeds the pre-processed model (Paddle exports weights as Constant nodes; the ORT
  pre-processing folds them into initializers).
* ``quantize_with_accuracy_control``: the same, then NNCF ranks the quantized operations by how much
  each one costs on a validation set and reverts them to float, most harmful first, until the drop is
  within the budget. The metric and the budget are the gate's own (``validation_metric``): for
  ``cosine``/``top1``/``iou`` the fidelity against fp32's outputs (fp32 scores 1.0) with an absolute
  budget of ``1 - floor``; for ``accuracy`` the labelled accuracy with the relative budget.

NNCF is optional: without it (``available()`` is False) these recipes are simply not planned.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.compression.data import Dataset
from server.compression.gate import GateSpec, measure_fidelity

#: Most calibration samples NNCF statistics are collected on (its default is 300).
SUBSET_SIZE = 300


def available() -> bool:
    try:
        import nncf  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        import nncf  # noqa: PLC0415
    except ImportError:
        return None
    return str(nncf.__version__)


def _feeds(data: Dataset, batch: int) -> list[dict[str, np.ndarray]]:
    return list(data.batches(batch))


def _session(model: Any) -> Any:
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _quiet() -> contextlib.AbstractContextManager[Any]:
    import nncf  # noqa: PLC0415

    nncf.set_log_level(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())  # progress bars


def _ignored(names: Sequence[str]) -> Any:
    import nncf  # noqa: PLC0415

    return nncf.IgnoredScope(names=list(names), validate=False) if names else None


def quantize(src: Path, dst: Path, calibration: Dataset, *, batch: int = 1, fast_bias_correction: bool = True,
             exclude: Sequence[str] = (), strip: bool = True) -> None:
    """``strip``: drop the shape annotations (value_info) from the file, as edgefleet ships it; the
    benchmark's NNCF peer keeps NNCF's file as NNCF writes it."""
    import nncf  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    feeds = _feeds(calibration, batch)
    with _quiet():
        quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), subset_size=min(SUBSET_SIZE, len(feeds)),
                                  fast_bias_correction=fast_bias_correction, ignored_scope=_ignored(exclude))
    if strip:
        del quantized.graph.value_info[:]  # shape annotations: ORT infers them at load
    onnx.save(quantized, str(dst))


def validation_metric(gate: GateSpec, reference: Sequence[np.ndarray], data: Dataset
                      ) -> tuple[Callable[[Any, Iterable[int]], tuple[float, list[float]]], float, str]:
    """``(validation_fn, max_drop, drop_type)`` for NNCF: the gate's metric on ``data`` (items are sample
    indices), against ``reference`` (fp32's outputs on ``data``)."""
    labels = data.labels
    metric = gate.metric
    if metric == "accuracy" and labels is None:  # no labels here: agreement with fp32's top-1 instead
        metric = "top1"
    spec = GateSpec.from_dict({**gate.to_dict(), "metric": metric, "max_abs_error": None})

    def validation_fn(model: Any, items: Iterable[int]) -> tuple[float, list[float]]:
        sess = _session(model)
        indices = list(items)
        outs: list[list[np.ndarray]] = [[] for _ in reference]
        for i in indices:
            for k, out in enumerate(sess.run(None, data.feed(i))):
                outs[k].append(out if data.per_sample else out[:1])
        got = [np.stack(o) if data.per_sample else np.concatenate(o) for o in outs]
        ref = [r[indices] for r in reference]
        lab = labels[indices] if labels is not None else None
        per_item = [measure_fidelity([r[j : j + 1] for r in ref], [g[j : j + 1] for g in got], spec,
                                     lab[j : j + 1] if lab is not None else None).value for j in range(len(indices))]
        return measure_fidelity(ref, got, spec, lab).value, per_item

    if metric == "accuracy":
        return validation_fn, gate.max_relative_drop, "relative"
    floor = {"cosine": gate.min_cosine, "top1": gate.min_top1, "iou": gate.min_iou}[metric]
    return validation_fn, max(0.0, 1.0 - floor), "absolute"


def quantize_with_accuracy_control(src: Path, dst: Path, calibration: Dataset, *, validation: Dataset,
                                   reference: Sequence[np.ndarray], gate: GateSpec, batch: int = 1,
                                   max_reverted: int | None = None) -> None:
    """``reference``: the fp32 model's outputs on ``validation`` (one entry per output, samples first)."""
    import nncf  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters  # noqa: PLC0415

    fn, max_drop, drop_type = validation_metric(gate, reference, validation)
    feeds = _feeds(calibration, batch)
    restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=max_reverted or 100)
    with _quiet():
        quantized = nncf.quantize_with_accuracy_control(
            onnx.load(str(src)), nncf.Dataset(feeds), nncf.Dataset(list(range(validation.samples))), fn,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE if drop_type == "absolute" else nncf.DropType.RELATIVE,
            subset_size=min(SUBSET_SIZE, len(feeds)), advanced_accuracy_restorer_parameters=restorer)
    onnx.save(quantized, str(dst))
