"""A chunk sink that keeps no artifact in memory: digests and decompression run as chunks arrive.

``Reassembly`` writes each decrypted chunk at ``index * chunk_size`` and, once every chunk is
there, asks the sink for the SHA-256 of the whole compressed stream. A real agent writes a file
and hashes it; a thousand simulated devices cannot each keep a 5 MB file in memory, so this sink
consumes the stream in order instead: the contiguous prefix is hashed, fed to the decompressor
(whose output is hashed and counted against the declared model size), and dropped. Chunks that
arrive ahead of the prefix wait in a bounded buffer (a shared broadcast arrives in order; a
re-sent range may not). The checks are the agent's: compressed SHA-256 (``Reassembly.finish``),
then decompression with the declared size as a hard cap, then the model's SHA-256. An uncompressed
artifact (``compression = "none"``) is its model: the one stream digest serves both checks (hashing the
same bytes twice was half the simulator's CPU at 1,000 devices).
"""

from __future__ import annotations

import hashlib

from agent.errors import EdgeError, IntegrityError
from agent.protocol.codec import Inflater

#: Out-of-order chunks held while waiting for the gap before them (bytes).
MAX_PENDING_BYTES = 16 << 20


class StreamingSink:
    """``ChunkSink`` for ``agent.core.reassembly.Reassembly`` that hashes and inflates in stream order."""

    def __init__(self, *, total_size: int, compression: str, model_size: int) -> None:
        self._inflater = Inflater(compression, model_size)  # IntegrityError for an unknown compression
        self.total_size = total_size
        self.compression = compression
        self.model_size = model_size
        self._next = 0
        self._pending: dict[int, bytes] = {}
        self._pending_bytes = 0
        self._stream = hashlib.sha256()
        self._model = None if compression == "none" else hashlib.sha256()  # "none": the stream is the model
        self.error: EdgeError | None = None

    def write_at(self, offset: int, data: bytes) -> None:
        if offset < self._next or offset in self._pending:
            return  # already consumed (Reassembly only writes new chunks; this is belt and braces)
        if offset != self._next:
            if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
                raise IntegrityError("too many out-of-order chunks buffered")  # the caller retries later
            self._pending[offset] = data
            self._pending_bytes += len(data)
            return
        self._consume(data)
        while self._next in self._pending:
            piece = self._pending.pop(self._next)
            self._pending_bytes -= len(piece)
            self._consume(piece)

    def _consume(self, data: bytes) -> None:
        self._next += len(data)
        self._stream.update(data)
        if self.error is not None:
            return
        try:
            for out in self._inflater.feed(data):  # counts the output against the declared size
                if self._model is not None:
                    self._model.update(out)
        except EdgeError as exc:
            self.error = exc

    def sha256(self) -> bytes:
        """SHA-256 of the compressed stream (what ``Reassembly.finish`` compares); empty until it is whole."""
        return self._stream.digest() if self._next == self.total_size else b""

    def check_model(self, sha256_hex: str) -> None:
        """After ``finish``: the decompressed model has the declared size and digest (IntegrityError if not)."""
        if self.error is not None:
            raise self.error
        tail = self._inflater.finish()
        model = self._stream.copy() if self._model is None else self._model
        model.update(tail)
        if model.hexdigest() != sha256_hex:
            raise IntegrityError("model digest mismatch after decompression")
