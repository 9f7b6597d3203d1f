"""Smaller LiteRT flatbuffers: what the runtime never reads goes, and identical arrays are stored once.

A full-int8 .tflite from LiteRT Quantizer carries, next to its int8 weights and int32 biases, a lot
the interpreter never needs: a name for every tensor, calibration min/max arrays on every quantized
tensor, buffers no tensor points at, conversion metadata. And it carries the same arrays many times
over: per-channel quantization stores an int64 zero point (always 0 for weights and biases) per
channel for every weight *and* bias tensor, and LiteRT refuses a shortened zero-point array, so a conv
with 128 output channels carries two identical 1 KB vectors of zeros. A flatbuffer vector is referenced
by offset, so identical vectors can be written once and referenced from every table that holds them
(flatbuffers' shared strings do the same); the reader and verifier see the same values.

``compact`` keeps every name the runtime or a client reads (graph inputs and outputs, the signatures'
names), every quantization scale and zero point, the op versions, the signatures and the
``min_runtime_version`` metadata: the model computes the same, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Metadata entries the runtime reads (the rest, such as CONVERSION_METADATA, are the converter's notes).
KEPT_METADATA = {"min_runtime_version"}


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` removed or shared, and the file sizes before and after."""

    names: int  # tensor names dropped
    ranges: int  # tensors whose calibration min/max went
    buffers: int  # buffers dropped (unreferenced, or duplicates of another)
    metadata: int  # metadata entries dropped
    before: int
    after: int


def _sharing_builder(size: int) -> Any:
    import flatbuffers  # type: ignore[import-untyped]  # noqa: PLC0415

    class SharingBuilder(flatbuffers.Builder):  # type: ignore[misc]
        """A builder that writes each distinct numpy vector once and hands out its offset again."""

        def __init__(self, initial: int) -> None:
            super().__init__(initial)
            self.seen: dict[tuple[str, bytes], int] = {}

        def CreateNumpyVector(self, x: np.ndarray) -> int:
            key = (x.dtype.str, x.tobytes())
            offset = self.seen.get(key)
            if offset is None:
                offset = int(super().CreateNumpyVector(x))
                self.seen[key] = offset
            return offset

    return SharingBuilder(size)


def _as_array(value: Any, dtype: str) -> Any:
    if value is None or (isinstance(value, np.ndarray) and value.dtype == np.dtype(dtype)):
        return value
    return np.asarray(list(value), dtype=dtype)


def serialize(model: Any) -> bytes:
    """``model`` (a ModelT) as a flatbuffer in which identical vectors (zero points, scales, shapes, op
    input lists, buffer contents) are stored once."""
    from ai_edge_litert.tools.flatbuffer_utils import _TFLITE_FILE_IDENTIFIER  # noqa: PLC0415

    for graph in model.subgraphs:
        for t in graph.tensors:
            t.shape = _as_array(t.shape, "<i4")
            t.shapeSignature = _as_array(t.shapeSignature, "<i4")
            q = t.quantization
            if q is not None:
                q.scale, q.zeroPoint = _as_array(q.scale, "<f4"), _as_array(q.zeroPoint, "<i8")
                q.min, q.max = _as_array(q.min, "<f4"), _as_array(q.max, "<f4")
        for o in graph.operators:
            o.inputs, o.outputs = _as_array(o.inputs, "<i4"), _as_array(o.outputs, "<i4")
        graph.inputs, graph.outputs = _as_array(graph.inputs, "<i4"), _as_array(graph.outputs, "<i4")
    for buf in model.buffers:
        buf.data = _as_array(buf.data, "u1") if buf.data is not None and len(buf.data) else None
    builder = _sharing_builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _kept_names(model: Any, index: int) -> set[int]:
    graph = model.subgraphs[index]
    kept = {int(i) for i in graph.inputs} | {int(i) for i in graph.outputs}
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == index:
            kept |= {int(m.tensorIndex) for m in [*sig.inputs, *sig.outputs]}
    return kept


def _dedupe_buffers(model: Any) -> int:
    """Point every tensor at the first buffer with its contents, then drop the buffers nothing points at
    (buffer 0, the empty sentinel, stays). Returns how many buffers went."""
    first: dict[bytes, int] = {}
    target: dict[int, int] = {}
    for i, buf in enumerate(model.buffers):
        data = buf.data
        if i == 0 or data is None or not len(data) or buf.offset:
            continue
        key = bytes(np.asarray(data, dtype=np.uint8))
        target[i] = first.setdefault(key, i)
    for graph in model.subgraphs:
        for t in graph.tensors:
            t.buffer = target.get(t.buffer, t.buffer)
    used = {0} | {t.buffer for g in model.subgraphs for t in g.tensors}
    used |= {m.buffer for m in model.metadata or []}
    keep = [i for i in range(len(model.buffers)) if i in used]
    if len(keep) == len(model.buffers):
        return 0
    new = {old: i for i, old in enumerate(keep)}
    dropped = len(model.buffers) - len(keep)
    model.buffers = [model.buffers[i] for i in keep]
    for graph in model.subgraphs:
        for t in graph.tensors:
            t.buffer = new[t.buffer]
    for m in model.metadata or []:
        m.buffer = new[m.buffer]
    return dropped


def strip(model: Any) -> tuple[int, int, int, int]:
    """Drop from ``model`` (a ModelT, in place) what the runtime never reads (module doc); returns how many
    (names, min/max ranges, buffers, metadata entries) went. ``serialize`` it then."""
    names = ranges = 0
    for index, graph in enumerate(model.subgraphs):
        kept = _kept_names(model, index)
        for i, t in enumerate(graph.tensors):
            if i not in kept and t.name:
                t.name = None
                names += 1
            q = t.quantization
            if q is not None and (q.min is not None or q.max is not None):
                q.min = q.max = None
                ranges += 1
    metadata = 0
    if model.metadata:
        kept_meta = [m for m in model.metadata if (m.name.decode() if isinstance(m.name, bytes) else str(m.name))
                     in KEPT_METADATA]
        metadata = len(model.metadata) - len(kept_meta)
        model.metadata = kept_meta
    model.description = None
    return names, ranges, _dedupe_buffers(model), metadata


def compact(src: Path, dst: Path) -> Compaction:
    """Write ``src`` without what the runtime does not read, identical arrays stored once (module doc)."""
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    raw = src.read_bytes()
    model: Any = flatbuffer_utils.read_model_from_bytearray(bytearray(raw))
    names, ranges, buffers, metadata = strip(model)
    data = serialize(model)
    dst.write_bytes(data)
    return Compaction(names, ranges, buffers, metadata, len(raw), len(data))
