"""The artifact codecs: compress (server) and undo it (agent, simulator), with the declared size as a hard cap.

One implementation for the three readers: ``decompress`` (a whole artifact in memory),
``agent.runtime.store`` (a file, streamed with bounded memory) and the simulator's streaming sink
(chunks as they arrive). All use ``Inflater``: output comes in pieces of at most ``OUT_BLOCK``
bytes, more than the declared size is ``ArtifactTooLargeError`` at once (a decompression bomb never
gets further), and ``finish`` refuses a truncated stream, data after its end, and a size other than
the declared one. Stdlib only (zlib, lzma).
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Iterator
from typing import Any

from agent.errors import ArtifactTooLargeError, IntegrityError
from agent.protocol.messages import COMPRESSIONS

#: The most one decompression step produces (bounds memory however well the input compresses).
OUT_BLOCK = 1 << 20


def compress(data: bytes, method: str) -> bytes:
    if method == "none":
        return data
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "lzma":
        return lzma.compress(data, preset=6)
    raise ValueError(f"unknown compression {method!r} (one of {', '.join(COMPRESSIONS)})")


class Inflater:
    """Undo ``compress`` incrementally; ``feed`` the stream in order, then ``finish``."""

    def __init__(self, method: str, expected_size: int) -> None:
        if method not in COMPRESSIONS:
            raise IntegrityError(f"unknown compression {method!r}")
        self.method = method
        self.expected_size = expected_size
        self.produced = 0
        self._d: Any = None
        if method == "zlib":
            self._d = zlib.decompressobj()
        elif method == "lzma":
            self._d = lzma.LZMADecompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decompressed pieces of the next part of the stream (IntegrityError / ArtifactTooLargeError)."""
        try:
            if self._d is None:
                if data:
                    yield self._count(data)
            elif self.method == "zlib":
                z = self._d
                if z.eof and data:
                    raise IntegrityError("data after the end of the zlib stream")
                while data:
                    out = z.decompress(data, OUT_BLOCK)
                    if out:
                        yield self._count(out)
                    data = z.unconsumed_tail
            else:
                x = self._d
                if x.eof and data:
                    raise IntegrityError("data after the end of the lzma stream")
                if data:
                    out = x.decompress(data, max_length=OUT_BLOCK)
                    if out:
                        yield self._count(out)
                while not x.needs_input and not x.eof:
                    out = x.decompress(b"", max_length=OUT_BLOCK)
                    if out:
                        yield self._count(out)
        except (zlib.error, lzma.LZMAError, EOFError) as exc:
            raise IntegrityError(f"artifact does not decompress with {self.method}: {exc}") from exc

    def finish(self) -> bytes:
        """The last output; refuses a truncated stream, trailing data and a size other than the declared one."""
        tail = b""
        if self.method == "zlib":
            z = self._d
            try:
                tail = z.flush()
            except zlib.error as exc:
                raise IntegrityError(f"artifact does not decompress with zlib: {exc}") from exc
            if tail:
                self._count(tail)
        if self.produced != self.expected_size:
            raise IntegrityError(f"decompressed size {self.produced} != declared {self.expected_size}")
        if self._d is not None and (not self._d.eof or self._d.unused_data):
            raise IntegrityError(f"{self.method} stream is truncated or has trailing data")
        return tail

    def _count(self, out: bytes) -> bytes:
        self.produced += len(out)
        if self.produced > self.expected_size:
            raise ArtifactTooLargeError(self.produced, self.expected_size)
        return out


def decompress(data: bytes, method: str, *, expected_size: int) -> bytes:
    """Undo ``compress`` on a whole artifact, never producing more than ``expected_size`` bytes."""
    inflater = Inflater(method, expected_size)
    out = b"".join(inflater.feed(data))
    return out + inflater.finish()


__all__ = ["OUT_BLOCK", "Inflater", "compress", "decompress"]
