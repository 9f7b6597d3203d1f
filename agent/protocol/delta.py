"""Model delta patches, format "EFD1": the bytes a device applies to a model it keeps to get the next version.

The format knows nothing of ONNX or .tflite: the server aligns tensors (it parses the models) and emits byte
operations over the base file; the device only copies, adds and XORs ranges, so any agent can apply any patch.

Layout (big-endian header, then one compressed body)::

    offset size field
    0      4    magic "EFD1"
    4      1    codec (1 = raw LZMA2, stdlib ``lzma`` FORMAT_RAW, dictionary 8 MiB, no container)
    5      3    reserved (0)
    8      8    target size (u64)
    16     8    base size (u64)
    24     ...  body: one raw LZMA2 stream of operations (ends with LZMA2's end marker)

Operations (one tag byte, then unsigned LEB128 varints; ``len`` > 0; the target is the concatenation of the
outputs, in order)::

    0x00 END                                                     must be the last operation
    0x01 COPY  base_off len                                      target += base[base_off : base_off+len]
    0x02 LIT   len        data[len]                              target += data
    0x03 ADD   width base_off len data[len]                      element-wise (base + data) mod 2**(8*width)
    0x04 XOR   width base_off len data[len]                      element-wise base XOR data
    0x05 ZLIT  dict_off dict_len len clen data[clen]             target += zlib-inflate(data) with the preset
                                                                 dictionary base[dict_off : dict_off+dict_len]
                                                                 (dict_len <= 32768; exactly len bytes out)

``width`` is one byte: low 4 bits the element width in bytes (1, 2, 4 or 8, little-endian elements; ``len`` a
multiple of it), bit 0x80 "byte-grouped": ``data`` holds byte 0 of every element, then byte 1 of every element, and
so on (ZipNN-style planes, which compress float XORs better). Every operation with data carries at most
``MAX_OP_BYTES``; encoders split larger ranges. A range must lie inside the base file.

Applying streams: base read by ranges, target written and hashed as produced, memory bounded by ``MAX_OP_BYTES``
plus the decompressor's window. The caller writes into a new file and trusts it only after ``apply`` returned
(size and SHA-256 both matched the header, which the caller also matched against the signed manifest).
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from agent.errors import IntegrityError, MalformedMessageError
from agent.protocol.messages import ArtifactInfo, DesiredState, WrappedKey

MAGIC = b"EFD1"
CODEC_XZ = 1
#: The body's filter chain: raw LZMA2 (no xz container: ~60 bytes less; the target's SHA-256 is the check).
FILTERS = ({"id": lzma.FILTER_LZMA2, "dict_size": 8 << 20},)
HEADER = struct.Struct(">4sB3xQQ")
HEADER_SIZE = HEADER.size  # 24
MAX_OP_BYTES = 1 << 20
OP_END, OP_COPY, OP_LIT, OP_ADD, OP_XOR, OP_ZLIT = 0, 1, 2, 3, 4, 5
MAX_ZDICT = 32768
GROUPED = 0x80
#: element dtypes by width (little-endian); numpy is imported where used: agent.protocol stays import-pure
_WIDTHS = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_READ = 1 << 16


class DeltaError(IntegrityError):
    """A patch that is malformed, does not fit its base, or does not produce its target."""

    code = "delta"


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    target_size: int
    base_size: int
    codec: int = CODEC_XZ

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.codec,
            self.target_size,
            self.base_size,
        )


def parse_header(data: bytes) -> DeltaHeader:
    if len(data) < HEADER_SIZE:
        raise DeltaError("delta shorter than its header")
    magic, codec, size, base_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeltaError("not a delta patch (bad magic)")
    if codec != CODEC_XZ:
        raise DeltaError(f"unknown delta codec {codec}")
    return DeltaHeader(size, base_size, codec)


# -- operations (encoder side; pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One operation. ``data`` is the payload as sent (already differenced and grouped) for LIT/ADD/XOR;
    for ZLIT ``base_off``/``width`` are the dictionary's offset and length and ``data`` the deflate stream."""

    tag: int
    length: int
    base_off: int = 0
    width: int = 1
    data: bytes = b""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def group_bytes(data: bytes, width: int) -> bytes:
    """Byte planes: byte 0 of every element, then byte 1, ..."""
    import numpy as np  # noqa: PLC0415

    if width == 1:
        return data
    return bytes(np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes())


def ungroup_bytes(data: bytes | memoryview, width: int) -> bytes:
    import numpy as np  # noqa: PLC0415

    if width == 1:
        return bytes(data)
    return bytes(np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes())


def diff_add(base: bytes, target: bytes, width: int) -> bytes:
    import numpy as np  # noqa: PLC0415

    dt = _WIDTHS[width]
    return bytes((np.frombuffer(target, dt) - np.frombuffer(base, dt)).tobytes())


def diff_xor(base: bytes, target: bytes, width: int) -> bytes:
    import numpy as np  # noqa: PLC0415

    dt = _WIDTHS[width]
    return bytes((np.frombuffer(target, dt) ^ np.frombuffer(base, dt)).tobytes())


def zlit(base: bytes, dict_off: int, dict_len: int, target: bytes) -> Op:
    """A ZLIT operation: ``target`` deflated against ``base[dict_off : dict_off + dict_len]``."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=base[dict_off : dict_off + dict_len])
    return Op(OP_ZLIT, len(target), dict_off, dict_len, comp.compress(target) + comp.flush())


def merge_copies(ops: Iterable[Op]) -> list[Op]:
    """Drop empty operations and join COPYs of adjacent base ranges."""
    merged: list[Op] = []
    for op in ops:
        if op.length <= 0:
            continue
        last = merged[-1] if merged else None
        if (
            op.tag == OP_COPY
            and last is not None
            and last.tag == OP_COPY
            and last.base_off + last.length == op.base_off
        ):
            merged[-1] = Op(OP_COPY, last.length + op.length, last.base_off)
        else:
            merged.append(op)
    return merged


def encode_ops(ops: Iterable[Op]) -> bytes:
    """The uncompressed operation stream, END appended."""
    out = bytearray()
    for op in merge_copies(ops):
        out.append(op.tag)
        if op.tag == OP_COPY:
            out += _varint(op.base_off) + _varint(op.length)
        elif op.tag == OP_ZLIT:
            out += _varint(op.base_off) + _varint(op.width) + _varint(op.length) + _varint(len(op.data)) + op.data
        elif op.tag == OP_LIT:
            out += _varint(op.length) + op.data
        else:
            out.append(op.width)
            out += _varint(op.base_off) + _varint(op.length) + op.data
    out.append(OP_END)
    return bytes(out)


def build_patch(header: DeltaHeader, ops: Iterable[Op], *, preset: int = 9 | lzma.PRESET_EXTREME) -> bytes:
    filters = [{**FILTERS[0], "preset": preset}]
    return header.pack() + lzma.compress(encode_ops(ops), format=lzma.FORMAT_RAW, filters=filters)


# -- apply (device side; streaming) ------------------------------------------------------------------------


class _Body:
    """The decompressed operation stream, read on demand with a cap on what it may expand to."""

    def __init__(self, source: Iterator[bytes], limit: int) -> None:
        self._source = source
        self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=list(FILTERS))
        self._buf = bytearray()
        self._pos = 0
        self._limit = limit
        self._total = 0

    def _fill(self, need: int) -> None:
        while len(self._buf) - self._pos < need:
            if self._dec.eof:
                raise DeltaError("delta body ends early")
            if self._dec.needs_input:
                chunk = next(self._source, b"")
                if not chunk:
                    raise DeltaError("delta body truncated")
            else:
                chunk = b""
            try:
                out = self._dec.decompress(chunk, max_length=_READ)
            except lzma.LZMAError as exc:
                raise DeltaError(f"delta body corrupt: {exc}") from None
            self._total += len(out)
            if self._total > self._limit:
                raise DeltaError("delta body expands past its limit")
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += out

    def read(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def byte(self) -> int:
        self._fill(1)
        b = self._buf[self._pos]
        self._pos += 1
        return b

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise DeltaError("varint too long")

    def finish(self) -> None:
        """The stream must end right after END (LZMA2 end marker reached, nothing trailing)."""
        if len(self._buf) != self._pos:
            raise DeltaError("data after the END operation")
        while not self._dec.eof:
            chunk = next(self._source, b"") if self._dec.needs_input else b""
            if self._dec.needs_input and not chunk:
                raise DeltaError("delta body truncated")
            try:
                extra = self._dec.decompress(chunk, max_length=1)
            except lzma.LZMAError as exc:
                raise DeltaError(f"delta body corrupt: {exc}") from None
            if extra:
                raise DeltaError("data after the END operation")
        if self._dec.unused_data or next(self._source, b""):
            raise DeltaError("bytes after the delta body")


def _read_base(base: BinaryIO, base_size: int, off: int, length: int) -> bytes:
    if off + length > base_size:
        raise DeltaError(f"operation reads past the base ({off}+{length} > {base_size})")
    base.seek(off)
    data = base.read(length)
    if len(data) != length:
        raise DeltaError("base shorter than expected")
    return data


def apply_patch(
    patch: Iterable[bytes],
    base: BinaryIO,
    out: BinaryIO,
    *,
    base_sha256: str,
    target_sha256: str,
    max_size: int,
) -> DeltaHeader:
    """Stream ``patch`` (its bytes, in pieces) over ``base`` into ``out``; returns the header once the target's
    size and SHA-256 matched. The digests come from the signed manifest (the patch does not carry them);
    ``max_size`` is the same cap as a full download. The base is hashed first, so a corrupted or substituted
    base fails before anything is written."""
    source = iter(patch)
    head = bytearray()
    for piece in source:
        head += piece
        if len(head) >= HEADER_SIZE:
            break
    header = parse_header(bytes(head))
    rest = bytes(head[HEADER_SIZE:])
    if header.target_size > max_size:
        raise DeltaError(f"delta target of {header.target_size} bytes exceeds the cap of {max_size}")
    base_sha = hashlib.sha256()
    base.seek(0)
    seen = 0
    while block := base.read(1 << 20):
        base_sha.update(block)
        seen += len(block)
    if seen != header.base_size or base_sha.hexdigest() != base_sha256:
        raise DeltaError("base does not match the delta (digest or size)")

    def pieces() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from source

    body = _Body(pieces(), limit=header.target_size + 64 * 1024 + header.target_size // 4)
    digest = hashlib.sha256()
    written = 0
    while True:
        tag = body.byte()
        if tag == OP_END:
            break
        if tag == OP_COPY:
            off, length = body.varint(), body.varint()
            width, grouped = 1, False
        elif tag == OP_LIT:
            length = body.varint()
            off, width, grouped = 0, 1, False
        elif tag in (OP_ADD, OP_XOR):
            w = body.byte()
            width, grouped = w & 0x0F, bool(w & GROUPED)
            if width not in _WIDTHS or w & 0x70:
                raise DeltaError(f"bad element width byte {w:#x}")
            off, length = body.varint(), body.varint()
        elif tag == OP_ZLIT:
            off, dict_len, length, clen = body.varint(), body.varint(), body.varint(), body.varint()
            if dict_len > MAX_ZDICT or clen > MAX_OP_BYTES or not 0 < length <= MAX_OP_BYTES:
                raise DeltaError("bad ZLIT operation")
            if written + length > header.target_size:
                raise DeltaError("delta writes past the target size")
            zdict = _read_base(base, header.base_size, off, dict_len)
            inflater = zlib.decompressobj(-15, zdict=zdict)
            try:
                data = inflater.decompress(body.read(clen), length)
            except zlib.error as exc:
                raise DeltaError(f"ZLIT data corrupt: {exc}") from None
            if len(data) != length or not inflater.eof or inflater.unconsumed_tail:
                raise DeltaError("ZLIT data does not inflate to its length")
            out.write(data)
            digest.update(data)
            written += length
            continue
        else:
            raise DeltaError(f"unknown delta operation {tag:#x}")
        if length <= 0 or length % width:
            raise DeltaError("bad operation length")
        if written + length > header.target_size:
            raise DeltaError("delta writes past the target size")
        if tag == OP_COPY:
            done = 0
            while done < length:
                step = min(MAX_OP_BYTES, length - done)
                piece = _read_base(base, header.base_size, off + done, step)
                out.write(piece)
                digest.update(piece)
                done += step
        else:
            if length > MAX_OP_BYTES:
                raise DeltaError("operation larger than MAX_OP_BYTES")
            data = body.read(length)
            if tag != OP_LIT:
                import numpy as np  # noqa: PLC0415

                if grouped:
                    data = ungroup_bytes(data, width)
                dt = _WIDTHS[width]
                old = np.frombuffer(_read_base(base, header.base_size, off, length), dt)
                new = np.frombuffer(data, dt)
                data = (old + new if tag == OP_ADD else old ^ new).tobytes()
            out.write(data)
            digest.update(data)
        written += length
    body.finish()
    if written != header.target_size:
        raise DeltaError(f"delta produced {written} bytes, expected {header.target_size}")
    if digest.hexdigest() != target_sha256:
        raise DeltaError("delta target digest mismatch")
    return header


def apply_bytes(patch: bytes, base: bytes, *, target_sha256: str, max_size: int) -> bytes:
    """Whole-buffer apply for tools and tests."""
    import io  # noqa: PLC0415

    out = io.BytesIO()
    base_sha256 = hashlib.sha256(base).hexdigest()
    apply_patch([patch], io.BytesIO(base), out, base_sha256=base_sha256, target_sha256=target_sha256, max_size=max_size)
    return out.getvalue()


# -- the manifest contract ---------------------------------------------------------------------------------

#: The signed desired state carries a delta offer under this key (beside the full ``artifact``/``key``).
DESIRED_FIELD = "delta"


@dataclass(frozen=True, slots=True)
class DeltaInfo:
    """A delta offer inside a signed deploy: the sealed patch (``artifact``, ``key``: chunked and encrypted like
    any artifact, ``compression`` "none"), the base it applies to (a version the device keeps, by digest) and the
    target it must produce (the full artifact's model digest and size). The full artifact stays in the same
    manifest: any problem with the delta falls back to it without another round trip."""

    artifact: ArtifactInfo
    key: WrappedKey
    base_version: int
    base_sha256: str
    target_sha256: str
    target_size: int

    def to_dict(self) -> dict[str, object]:
        return {
            "artifact": self.artifact.to_dict(),
            "key": self.key.to_dict(),
            "base_version": self.base_version,
            "base_sha256": self.base_sha256,
            "target_sha256": self.target_sha256,
            "target_size": self.target_size,
        }

    @classmethod
    def from_dict(cls, d: object) -> DeltaInfo:
        if not isinstance(d, dict):
            raise MalformedMessageError("delta must be an object", field=DESIRED_FIELD)
        art, key = d.get("artifact"), d.get("key")
        if not isinstance(art, dict) or not isinstance(key, dict):
            raise MalformedMessageError("delta needs artifact and key objects", field=DESIRED_FIELD)
        info = ArtifactInfo.from_dict(art)
        if info.compression != "none":
            raise MalformedMessageError("a delta artifact is not compressed again", field=DESIRED_FIELD)
        values = []
        for name in ("base_sha256", "target_sha256"):
            v = d.get(name)
            if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise MalformedMessageError(f"delta {name} must be 64 lowercase hex digits", field=DESIRED_FIELD)
            values.append(v)
        ints = []
        for name in ("base_version", "target_size"):
            v = d.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 1 << 40:
                raise MalformedMessageError(f"delta {name} must be a positive integer", field=DESIRED_FIELD)
            ints.append(v)
        return cls(info, WrappedKey.from_dict(key), ints[0], values[0], values[1], ints[1])


def delta_offer(desired: DesiredState) -> DeltaInfo | None:
    """The desired state's delta offer, or None. Raises MalformedMessageError for a malformed or inconsistent
    one (the caller falls back to the full artifact and reports why)."""
    raw = desired.extra.get(DESIRED_FIELD)
    if raw is None:
        return None
    offer = DeltaInfo.from_dict(raw)
    full = desired.artifact
    if full is None or (offer.target_sha256, offer.target_size) != (full.sha256, full.size):
        raise MalformedMessageError("delta target does not match the full artifact", field=DESIRED_FIELD)
    if offer.base_version >= desired.model.version:
        raise MalformedMessageError("delta base must be an older version", field=DESIRED_FIELD)
    return offer
