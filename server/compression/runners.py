"""Run a model file on this machine: ONNX Runtime (CPU) or LiteRT, over a data set, and time it.

Used for the reference (fp32) outputs, each candidate's outputs and the latency of both. Sessions
run with one intra-op thread so latencies compare variant against variant on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.protocol.messages import ONNX_DTYPES, TensorSpec
from server.compression.data import Dataset
from server.errors import ModelError

MAX_BATCH = 32


class Runner(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def _dim(d: Any) -> int:
    return d if isinstance(d, int) and d >= 0 else -1


class OrtRunner:
    def __init__(self, path: Path, *, threads: int = 1) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        self.inputs = tuple(
            TensorSpec(i.name, ONNX_DTYPES.get(i.type, "float32"), tuple(_dim(d) for d in i.shape))
            for i in self.session.get_inputs()
        )
        self.outputs = tuple(
            TensorSpec(o.name, ONNX_DTYPES.get(o.type, "float32"), tuple(_dim(d) for d in (o.shape or ())))
            for o in self.session.get_outputs()
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return [np.asarray(o) for o in self.session.run(None, dict(feeds))]
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed to run the model: {exc}") from exc


class LiteRtRunner:
    """LiteRT interpreter; int8/uint8 I/O is (de)quantized with the tensor's own scale and zero point."""

    def __init__(self, path: Path, *, threads: int = 1, xnnpack: bool = True) -> None:
        """``xnnpack=False``: LiteRT's builtin kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), the
        path a device takes for ops XNNPACK does not delegate; the default (``AUTO``) applies XNNPACK."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interp = Interpreter(model_path=str(path), num_threads=threads,
                                      experimental_op_resolver_type=resolver)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load {path.name}: {exc}") from exc
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = tuple(
            TensorSpec(d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape_signature"]))
            for d in self._in
        )
        self.outputs = tuple(
            TensorSpec(d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape_signature"]))
            for d in self._out
        )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            for d in self._in:
                x = feeds[d["name"]]
                if tuple(d["shape"]) != x.shape:
                    self.interp.resize_tensor_input(d["index"], list(x.shape))
                    self.interp.allocate_tensors()
                    self._in = self.interp.get_input_details()
                    self._out = self.interp.get_output_details()
                    return self.run(feeds)
                scale, zero = d["quantization"]
                if np.dtype(d["dtype"]).kind in "iu" and x.dtype.kind == "f" and scale:
                    info = np.iinfo(d["dtype"])
                    x = np.clip(np.round(x / scale + zero), info.min, info.max)
                self.interp.set_tensor(d["index"], x.astype(d["dtype"], copy=False))
            self.interp.invoke()
            out = []
            for d in self._out:
                y = self.interp.get_tensor(d["index"])
                scale, zero = d["quantization"]
                if np.dtype(d["dtype"]).kind in "iu" and scale:
                    y = (y.astype(np.float32) - zero) * scale
                out.append(np.array(y))
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"LiteRT failed to run the model: {exc}") from exc
        return out


def open_runner(path: Path, fmt: str, *, threads: int = 1) -> Runner:
    return OrtRunner(path, threads=threads) if fmt == "onnx" else LiteRtRunner(path, threads=threads)


def _batch_size(inputs: Sequence[TensorSpec]) -> int:
    firsts = {t.shape[0] if t.shape else 1 for t in inputs}
    return MAX_BATCH if firsts == {-1} else max(1, min(f for f in firsts if f > 0) if firsts - {-1} else 1)


def run_dataset(runner: Runner, data: Dataset) -> list[np.ndarray]:
    """Every output over every sample: the sample axis first, then each sample's own output shape.

    Batch-first data: an output whose first axis is the batch keeps its shape, one row per sample.
    Per-sample data (or an output without a batch axis): each run's whole output is one sample.
    When samples' outputs differ in shape, each is flattened (and must then have the same size).
    """
    batch = _batch_size(runner.inputs)
    parts: list[list[np.ndarray]] = [[] for _ in runner.outputs]
    for feeds in data.batches(batch):
        n = 1 if data.per_sample else len(next(iter(feeds.values())))
        if not data.per_sample and n < batch and batch > 1 and _batch_size(runner.inputs) != MAX_BATCH:
            break  # a fixed batch larger than the remainder: drop the tail
        for i, out in enumerate(runner.run(feeds)):
            per_sample = data.per_sample or not (out.ndim and out.shape[0] == n)
            parts[i].append(out[None] if per_sample else out)
    return [_stack(p) for p in parts]


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    if len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts, axis=0)
    flat = [p.reshape(p.shape[0], -1) for p in parts]
    if len({f.shape[1] for f in flat}) > 1:
        raise ModelError("the model's outputs differ in size from one sample to the next; the gate cannot compare "
                         "them")
    return np.concatenate(flat, axis=0)


def sample_feed(runner: Runner, data: Dataset) -> dict[str, np.ndarray]:
    """One inference request (the first sample, or the model's fixed batch)."""
    batch = _batch_size(runner.inputs)
    return data.first(1 if batch == MAX_BATCH else batch)


def latency_ms(
    runner: Runner, feed: Mapping[str, np.ndarray], *, runs: int = 30, budget_s: float = 3.0
) -> tuple[float, float]:
    """(median, best) wall time of one request after two warm-up runs (stops early after ``budget_s``)."""
    for _ in range(2):
        runner.run(feed)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        runner.run(feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), min(times)


def median_latency_ms(
    runner: Runner, feed: Mapping[str, np.ndarray], *, runs: int = 30, budget_s: float = 3.0
) -> float:
    return latency_ms(runner, feed, runs=runs, budget_s=budget_s)[0]
