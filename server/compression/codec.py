"""Artifact compression before encryption: pick the codec that is worth its decompression cost.

Encrypted bytes do not compress, so the server compresses the model *before* sealing
(``server.artifacts`` applies the codec named on the build). lzma usually wins on float weights
with zeros (pruned) and on int8 weights; when it saves under ``MIN_GAIN`` of the raw size the
device would pay lzma's decompression for little, so zlib (cheap) or none is chosen instead.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass

from agent.protocol.envelope import CHUNK_HEADER_SIZE, TAG_SIZE

#: lzma must save at least this fraction of the raw size to be chosen.
MIN_GAIN = 0.10
#: zlib is used instead of none when it saves at least this fraction.
MIN_ZLIB_GAIN = 0.02
#: Files above this size are judged on SAMPLE_SLICES slices of SAMPLE_SLICE bytes.
SAMPLE_ABOVE = 8 << 20
SAMPLE_SLICE = 512 << 10
SAMPLE_SLICES = 4
#: Sealed-chunk overhead: the chunk header plus the AES-GCM tag (agent/protocol/envelope.py).
SEAL_OVERHEAD_PER_CHUNK = CHUNK_HEADER_SIZE + TAG_SIZE


@dataclass(frozen=True)
class CodecChoice:
    compression: str  # lzma | zlib | none (agent.protocol.messages.COMPRESSIONS)
    raw_size: int
    compressed_size: int
    lzma_size: int
    zlib_size: int
    estimated: bool = False  # sizes extrapolated from a sample of the file

    @property
    def ratio(self) -> float:
        return self.compressed_size / self.raw_size if self.raw_size else 1.0


def _sample(data: bytes) -> bytes:
    """SAMPLE_SLICES evenly spaced slices of SAMPLE_SLICE bytes (weights differ along a model file)."""
    step = (len(data) - SAMPLE_SLICE) // (SAMPLE_SLICES - 1)
    return b"".join(data[i * step : i * step + SAMPLE_SLICE] for i in range(SAMPLE_SLICES))


def choose_codec(data: bytes) -> CodecChoice:
    """Compress with lzma and zlib and pick; above SAMPLE_ABOVE bytes the sizes are estimated from a sample
    (lzma runs at ~1 MB/s on a busy 2-core machine; sealing compresses the whole file anyway)."""
    raw = len(data)
    estimated = raw > SAMPLE_ABOVE
    probe = _sample(data) if estimated else data
    scale = raw / len(probe) if probe else 1.0
    lz = round(len(lzma.compress(probe, preset=6)) * scale)
    zl = round(len(zlib.compress(probe, 9)) * scale)
    if raw and lz <= raw * (1 - MIN_GAIN):
        return CodecChoice("lzma", raw, lz, lz, zl, estimated)
    if raw and zl <= raw * (1 - MIN_ZLIB_GAIN):
        return CodecChoice("zlib", raw, zl, lz, zl, estimated)
    return CodecChoice("none", raw, raw, lz, zl, estimated)


def ota_size(compressed_size: int, chunk_size: int) -> int:
    """Bytes sent over the air: the compressed artifact plus the per-chunk seal overhead."""
    chunks = max(1, -(-compressed_size // chunk_size))
    return compressed_size + chunks * SEAL_OVERHEAD_PER_CHUNK
