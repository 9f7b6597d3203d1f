"""The simulator's streaming sink: the agent's digest and decompression checks without keeping the artifact."""

from __future__ import annotations

import os

import pytest

from agent.core.reassembly import Reassembly
from agent.errors import ArtifactTooLargeError, IntegrityError
from agent.protocol.envelope import ChunkOpener, seal_artifact
from server.simulator.sink import StreamingSink

MODEL = os.urandom(50_000) + bytes(30_000)  # partly compressible


@pytest.mark.parametrize("compression", ["none", "zlib", "lzma"])
@pytest.mark.parametrize("order", ["in", "reversed"])
def test_a_whole_artifact_passes_both_digests_in_any_order(compression: str, order: str) -> None:
    art = seal_artifact(MODEL, chunk_size=4096, compression=compression)
    info = art.info
    opener = ChunkOpener(art.data_key, info)
    sink = StreamingSink(total_size=info.compressed_size, compression=compression, model_size=info.size)
    r = Reassembly.for_artifact(info, max_bytes=1 << 20)
    chunks = art.chunks if order == "in" else list(reversed(art.chunks))
    for wire in chunks:
        opened = opener.open_chunk(wire)
        r.add(opened.index, opened.data, sink, fingerprint=opened.tag)
    r.finish(sink)
    sink.check_model(info.sha256)


def test_a_wrong_model_digest_or_size_is_refused() -> None:
    art = seal_artifact(MODEL, chunk_size=4096, compression="zlib")
    info = art.info
    sink = StreamingSink(total_size=info.compressed_size, compression="zlib", model_size=info.size)
    opener = ChunkOpener(art.data_key, info)
    for wire in art.chunks:
        opened = opener.open_chunk(wire)
        sink.write_at(opened.index * info.chunk_size, opened.data)
    with pytest.raises(IntegrityError):
        sink.check_model("00" * 32)
    small = StreamingSink(total_size=info.compressed_size, compression="zlib", model_size=info.size - 1)
    for wire in art.chunks:
        opened = opener.open_chunk(wire)
        small.write_at(opened.index * info.chunk_size, opened.data)
    with pytest.raises(ArtifactTooLargeError):  # more output than declared: the cap holds
        small.check_model(info.sha256)


def test_an_incomplete_stream_has_no_digest() -> None:
    sink = StreamingSink(total_size=10, compression="none", model_size=10)
    sink.write_at(5, b"world")
    assert sink.sha256() == b""
    sink.write_at(0, b"hello")
    assert sink.sha256() != b""


def test_an_uncompressed_artifact_is_checked_against_the_model_digest_with_one_hash() -> None:
    art = seal_artifact(MODEL, chunk_size=4096, compression="none")
    info = art.info
    opener = ChunkOpener(art.data_key, info)
    sink = StreamingSink(total_size=info.compressed_size, compression="none", model_size=info.size)
    for wire in art.chunks:
        opened = opener.open_chunk(wire)
        sink.write_at(opened.index * info.chunk_size, opened.data)
    with pytest.raises(IntegrityError):
        sink.check_model("00" * 32)
    sink.check_model(info.sha256)  # the stream digest is still whole after a refused check
    short = StreamingSink(total_size=info.compressed_size, compression="none", model_size=info.size - 1)
    with pytest.raises(ArtifactTooLargeError):  # the declared size still caps an uncompressed stream
        for wire in art.chunks:
            opened = opener.open_chunk(wire)
            short.write_at(opened.index * info.chunk_size, opened.data)
        short.check_model(info.sha256)
