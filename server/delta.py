"""Build model delta patches (format in ``agent.protocol.delta``): tensor-aligned, per-tensor encodings.

The server parses both model files to find each weight tensor's byte range (ONNX initializer ``raw_data``;
other formats are treated as one region), pairs tensors by name (same size), and emits, in target order:
identical tensors as COPY, integer tensors as element-wise ADD (an arithmetic difference), float tensors as
byte-grouped XOR or ADD, whichever compresses smaller (a quick zlib probe decides per tensor), and the bytes
between tensors (graph, names, attributes) as a byte-wise ADD against the matching base gap when the lengths
agree, else literally. The whole stream is then xz-compressed. Choices measured in ``scripts/bench_delta.py``.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import EdgeError
from agent.protocol.delta import (
    GROUPED,
    MAX_OP_BYTES,
    MAX_ZDICT,
    OP_ADD,
    OP_COPY,
    OP_LIT,
    OP_XOR,
    DeltaHeader,
    Op,
    build_patch,
    diff_add,
    diff_xor,
    group_bytes,
    zlit,
)
from agent.protocol.envelope import open_artifact, seal_artifact
from server.errors import ServerError
from server.keys import atomic_write
from server.registry.fleet import ArtifactRecord, FleetRegistry

if TYPE_CHECKING:
    from server.artifacts import ArtifactStore

log = logging.getLogger("edgefleet.delta")
#: the same cap as server.artifacts.MAX_MODEL_BYTES (not imported: server.artifacts imports the registry too)
MAX_MODEL_BYTES = 2 * 1024**3

#: A delta larger than this share of the full artifact is not worth sending (the device gets the full one).
DEFAULT_MAX_RATIO = 0.60
#: Tensors smaller than this are left in the gaps (a short byte string may occur elsewhere in the file).
MIN_TENSOR_BYTES = 64


@dataclass(frozen=True, slots=True)
class Region:
    """A tensor's bytes inside a model file."""

    name: str
    offset: int
    length: int
    width: int  # element size in bytes
    is_float: bool


# ONNX TensorProto data types -> (element width, is float)
_ONNX_TYPES = {
    1: (4, True), 2: (1, False), 3: (1, False), 4: (2, False), 5: (2, False), 6: (4, False), 7: (8, False),
    9: (1, False), 10: (2, True), 11: (8, True), 12: (4, False), 13: (8, False), 16: (2, True),
}  # fmt: skip


def onnx_regions(data: bytes) -> list[Region]:
    """Initializer ranges of an ONNX file (raw_data located in the serialized bytes, in order)."""
    import onnx  # noqa: PLC0415 - server-only dependency

    model = onnx.load_model_from_string(data)
    out: list[Region] = []
    cursor = 0

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)

    for init in walk(model.graph):
        raw = init.raw_data
        if len(raw) < MIN_TENSOR_BYTES or init.data_type not in _ONNX_TYPES:
            continue
        at = data.find(raw, cursor)
        if at < 0:
            continue
        width, is_float = _ONNX_TYPES[init.data_type]
        out.append(Region(init.name, at, len(raw), width, is_float))
        cursor = at + len(raw)
    return out


def regions(data: bytes, fmt: str) -> list[Region]:
    if fmt == "onnx":
        try:
            return onnx_regions(data)
        except Exception:  # noqa: BLE001 - an unparsable file is diffed as one region
            return []
    return []


def _probe(data: bytes) -> int:
    return len(zlib.compress(data, 1))


def _split(tag: int, base_off: int, length: int, width: int, payload: bytes) -> Iterator[Op]:
    step = MAX_OP_BYTES - MAX_OP_BYTES % max(width, 1)
    for start in range(0, length, step):
        n = min(step, length - start)
        yield Op(tag, n, base_off + start, width, payload[start : start + n])


def _encode_range(base: bytes, target: bytes, base_off: int, width: int, is_float: bool) -> list[Op]:
    """One aligned range: COPY if identical, else the smallest of ADD / grouped XOR / grouped ADD / literal."""
    if base == target:
        return [Op(OP_COPY, len(target), base_off)]
    if len(target) % width:
        width = 1
    candidates: list[tuple[int, int, bytes]] = [(OP_ADD, width, diff_add(base, target, width))]
    if is_float or width > 1:
        candidates.append((OP_XOR, width | GROUPED, group_bytes(diff_xor(base, target, width), width)))
        candidates.append((OP_ADD, width | GROUPED, group_bytes(diff_add(base, target, width), width)))
    candidates.append((OP_LIT, 1, target))
    tag, w, payload = min(candidates, key=lambda c: _probe(c[2]))
    if w & GROUPED:
        # grouping is per operation: split the plain range, then group each piece
        raw = diff_xor(base, target, width) if tag == OP_XOR else diff_add(base, target, width)
        step = MAX_OP_BYTES - MAX_OP_BYTES % width
        return [
            Op(tag, min(step, len(raw) - s), base_off + s, w, group_bytes(raw[s : s + step], width))
            for s in range(0, len(raw), step)
        ]
    return list(_split(tag, base_off, len(target), w, payload))


def delta_ops(base: bytes, target: bytes, fmt: str) -> list[Op]:
    """Operations that turn ``base`` into ``target``: paired tensors by ``_encode_range``, the rest by ``_gap``."""
    b_regions = {r.name: r for r in regions(base, fmt)}
    paired = [
        (r, b_regions[r.name])
        for r in regions(target, fmt)
        if r.name in b_regions and b_regions[r.name].length == r.length
    ]
    ops: list[Op] = []
    matcher = _Matcher(base)
    t_pos = b_pos = 0  # b_pos: where the base bytes matching target[t_pos:] start
    for r, b in paired:
        ops += _gap(base, target, t_pos, r.offset, b_pos, matcher=matcher)
        t_bytes = target[r.offset : r.offset + r.length]
        ops += _encode_range(base[b.offset : b.offset + b.length], t_bytes, b.offset, r.width, r.is_float)
        t_pos, b_pos = r.offset + r.length, b.offset + b.length
    ops += _gap(base, target, t_pos, len(target), b_pos, matcher=matcher)
    return ops


def _gap(base: bytes, target: bytes, start: int, end: int, b_start: int, *, matcher: _Matcher) -> list[Op]:
    """Target bytes ``[start, end)`` that are not a paired tensor; ``b_start`` is where their base twin starts.

    Same length as the base twin: a byte-wise range (COPY/ADD) if that compresses smaller than the matcher's
    COPY/ADD/LIT; if the matcher gives up (mostly new bytes), pieces of up to 16 KiB deflated against a 32 KiB base
    window centred on the matching base position (ZLIT), or literal."""
    if end <= start:
        return []
    chunk = target[start:end]
    twin = base[b_start : b_start + len(chunk)]
    ranged: list[Op] = []
    if len(twin) == len(chunk):
        ranged = _encode_range(twin, chunk, b_start, 1, False)
        if len(ranged) == 1 and ranged[0].tag == OP_COPY:
            return ranged
    matched = matcher.ops(target, start, end, b_start - start, budget=int(0.6 * (end - start)) + 64)
    if matched is not None:
        ranged_cost = sum(_probe(o.data) for o in ranged) if ranged else None
        matched_cost = sum(_probe(o.data) + 6 for o in matched)
        return ranged if ranged_cost is not None and ranged_cost <= matched_cost else matched
    piece = MAX_ZDICT // 2
    zl: list[Op] = []
    for k in range(0, len(chunk), piece):
        part = chunk[k : k + piece]
        centre = min(b_start + k, len(base))
        lo = max(0, min(centre - MAX_ZDICT // 2, len(base) - MAX_ZDICT))
        hi = min(len(base), lo + MAX_ZDICT)
        op = zlit(base, lo, hi - lo, part)
        # the dictionary must pay: else a literal, which the body's LZMA2 compresses across pieces
        zl.append(op if len(op.data) < 0.8 * len(zlib.compress(part, 9)) else Op(OP_LIT, len(part), data=part))
    if ranged and sum(_probe(o.data) for o in ranged) <= sum(
        _probe(o.data) if o.tag == OP_LIT else len(o.data) for o in zl
    ):
        return ranged
    return zl


def make_delta(base: bytes, target: bytes, fmt: str) -> bytes:
    """A complete EFD1 patch from ``base`` to ``target``."""
    header = DeltaHeader(target_size=len(target), base_size=len(base))
    return build_patch(header, delta_ops(base, target, fmt))


def model_format(path: Path) -> str:
    return "onnx" if path.suffix == ".onnx" else path.suffix.lstrip(".")


def worth_sending(delta_size: int, full_size: int, max_ratio: float = DEFAULT_MAX_RATIO) -> bool:
    """The delta goes out only when it is at most ``max_ratio`` of the full artifact."""
    return delta_size <= max_ratio * full_size


# -- server integration: delta artifacts for a deployment ---------------------------------------------------


@dataclass(frozen=True)
class DeltaOffer:
    """What the signer puts beside the full artifact in one device's deploy."""

    artifact: ArtifactRecord  # the sealed patch (compression "none"), content-keyed ``delta:<base>:<target>:<chunk>``
    base_version: int
    base_sha256: str


class DeltaBuilder:
    """Builds, seals and caches delta artifacts between sealed full artifacts (both decrypted here with their data
    keys: the server holds them). One per (base, target) pair, shared by every device on that base (one broadcast
    stream). A pair whose delta is over ``max_ratio`` of the full artifact is remembered as not worth it.

    Builds run on one background thread, off the dispatch path: ``offer`` starts the pair's build (once) and
    waits for it at most ``wait_s`` (None: as long as it takes); a build still running then means no delta for
    this dispatch (the device gets the full artifact, as if no delta were worth it) and the next dispatch that
    asks after it is done gets the delta."""

    def __init__(self, store: ArtifactStore, *, max_ratio: float = DEFAULT_MAX_RATIO,
                 wait_s: float | None = None) -> None:
        self.store = store
        self.max_ratio = max_ratio
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._none: set[tuple[str, str]] = set()
        self._builds: dict[tuple[str, str], Future[ArtifactRecord | None]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def offer(self, model: str, profile: str, kept: Sequence[int], target: ArtifactRecord) -> DeltaOffer | None:
        """A delta from the newest kept version below the target's, or None (no base, not worth it, error, or
        still being built after ``wait_s``)."""
        older = [v for v in kept if v < target.version]
        if not older or self.max_ratio <= 0:
            return None
        base = self.store.registry.artifact_of(model, max(older), profile)
        if base is None or base.artifact_id == target.artifact_id:
            return None
        pair = (base.artifact_id, target.artifact_id)
        with self._lock:
            if pair in self._none:
                return None
            job = self._builds.get(pair)
            if job is not None and job.done() and (
                    job.exception() is not None or (rec := job.result()) is None
                    or not self.store.path(rec.artifact_id).exists()):
                job = None  # its file was collected since: build it again
            if job is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgefleet-delta")
                job = self._builds[pair] = self._pool.submit(self._build_pair, pair, base, target)
        try:
            record = job.result(timeout=self.wait_s)
        except TimeoutError:
            log.info("delta %s -> %s still building after %g s: this dispatch sends the full artifact",
                     base.artifact_id, target.artifact_id, self.wait_s or 0.0)
            return None
        if record is None:
            return None
        return DeltaOffer(record, base.version, str(base.info["sha256"]))

    def _build_pair(self, pair: tuple[str, str], base: ArtifactRecord, target: ArtifactRecord) -> ArtifactRecord | None:
        try:
            record = self._build(base, target)
        except (ServerError, EdgeError, OSError, ValueError) as exc:
            log.warning("no delta %s -> %s: %s", base.artifact_id, target.artifact_id, exc)
            record = None
        if record is None:
            with self._lock:
                self._none.add(pair)
                self._builds.pop(pair, None)
        return record

    def close(self) -> None:
        """Stop the build thread (a build under way finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _open(self, rec: ArtifactRecord) -> bytes:
        info = self.store.info(rec.artifact_id)
        chunks = (self.store.chunk(rec.artifact_id, i) for i in range(info.chunk_count))
        return open_artifact(chunks, rec.data_key, info, max_size=MAX_MODEL_BYTES)

    def _build(self, base: ArtifactRecord, target: ArtifactRecord) -> ArtifactRecord | None:
        full = self.store.info(target.artifact_id)
        key = f"delta:{base.info['sha256']}:{full.sha256}:{full.chunk_size}"
        existing = self.store.registry.find_artifact(key)
        if existing is not None and self.store.path(existing.artifact_id).exists():
            return existing
        base_bytes, target_bytes = self._open(base), self._open(target)
        fmt = "onnx" if base_bytes[:1] == b"\x08" and target_bytes[:1] == b"\x08" else "raw"
        patch = make_delta(base_bytes, target_bytes, fmt)
        sealed = seal_artifact(patch, chunk_size=full.chunk_size, compression="none", shared_topic=False)
        if not worth_sending(sealed.wire_bytes, target.wire_bytes, self.max_ratio):
            return None
        atomic_write(self.store.path(sealed.info.artifact_id), b"".join(sealed.chunks))
        record = ArtifactRecord(
            artifact_id=sealed.info.artifact_id, content_key=key, model=target.model, version=target.version,
            profile=target.profile, variant="delta", info=sealed.info.to_dict(), data_key=sealed.data_key,
            wire_bytes=sealed.wire_bytes, created_at=time.time(),
        )  # fmt: skip
        stored = self.store.registry.put_artifact(record)
        if stored.artifact_id != record.artifact_id:
            self.store.path(record.artifact_id).unlink(missing_ok=True)
        return stored


# -- what operators see: `edgefleet deployments show` and /metrics -------------------------------------------


def transfer_summary(registry: FleetRegistry, deployment_id: str) -> dict[str, int]:
    """Model bytes a deployment's devices fetched vs what full artifacts would have cost (per device, as each
    device reports: ``delta.applied`` carries the patch size; a fallback fetched the full artifact)."""
    builds = registry.deployment_builds(deployment_id)
    full_of = {p: registry.get_artifact(b.artifact_id).wire_bytes for p, b in builds.items()}
    rows = registry.deployment_devices(deployment_id)
    events = registry.list_events(deployment_id=deployment_id, kind_prefix="delta.", limit=100_000)
    applied = {e.device_id: e.data for e in events if e.kind == "delta.applied"}
    fell = {e.device_id for e in events if e.kind == "delta.fallback"}
    sent = full = 0
    for r in rows:
        if r.dispatched_at is None:
            continue
        size = full_of.get(r.profile, 0)
        full += size
        got = applied.get(r.device_id)
        sent += int(got.get("delta_bytes") or size) if got is not None else size
    return {"bytes_sent": sent, "bytes_full": full, "devices_delta": len(applied), "devices_fallback": len(fell)}


# -- byte matching for the bytes between tensors (and for files without tensor regions) ----------------------

#: a run of at least this many equal bytes becomes a COPY
MIN_MATCH = 24
#: base blocks indexed for re-synchronising after an insertion or deletion
BLOCK = 16


def _common(a: bytes, i: int, b: bytes, j: int, limit: int) -> int:
    """Length of the common prefix of ``a[i:]`` and ``b[j:]``, at most ``limit`` (vectorised, growing steps)."""
    import numpy as np  # noqa: PLC0415

    n = min(len(a) - i, len(b) - j, limit)
    done, step = 0, 64
    while done < n:
        k = min(step, n - done)
        diff = np.flatnonzero(np.frombuffer(a, np.uint8, k, i + done) != np.frombuffer(b, np.uint8, k, j + done))
        if diff.size:
            return done + int(diff[0])
        done += k
        step = min(step * 8, 1 << 20)
    return n


def _index(base: bytes) -> dict[bytes, int]:
    idx: dict[bytes, int] = {}
    for i in range(0, len(base) - BLOCK + 1, BLOCK):
        idx.setdefault(base[i : i + BLOCK], i)
    return idx


class _Matcher:
    """Greedy forward matcher (rsync-like): COPY the runs target and base share at the current shift, re-sync the
    shift through an index of base blocks after an insertion or a deletion, send the rest as ADD (same-length
    stretches at the current shift) or LIT. Gives up (None) when more than ``budget`` bytes stay unmatched."""

    def __init__(self, base: bytes) -> None:
        self.base = base
        self._idx: dict[bytes, int] | None = None

    def ops(self, target: bytes, start: int, end: int, shift: int, budget: int) -> list[Op] | None:
        base = self.base
        out: list[Op] = []
        p = lit = start
        unmatched = 0
        while p < end:
            q = p + shift
            n = _common(target, p, base, q, end - p) if 0 <= q < len(base) else 0
            if n >= MIN_MATCH:
                out += self._literal(target, lit, p, shift)
                out.append(Op(OP_COPY, n, q))
                p = lit = p + n
                continue
            if self._idx is None:
                self._idx = _index(base)
            hit = self._idx.get(target[p : p + BLOCK])
            if hit is not None and hit - p != shift and _common(target, p, base, hit, end - p) >= MIN_MATCH:
                shift = hit - p
                continue
            p += 1
            unmatched += 1
            if unmatched > budget:
                return None
        out += self._literal(target, lit, end, shift)
        return out

    def _literal(self, target: bytes, a: int, b: int, shift: int) -> list[Op]:
        if b <= a:
            return []
        chunk = target[a:b]
        if b - a >= 64 and a + shift >= 0 and b + shift <= len(self.base):
            return list(_split(OP_ADD, a + shift, b - a, 1, diff_add(self.base[a + shift : b + shift], chunk, 1)))
        return list(_split(OP_LIT, 0, b - a, 1, chunk))
