"""EFD1 delta patches: the streaming apply (agent.protocol.delta), pure. Agent-only dependencies, so these run
on the agent's Python 3.10 too (scripts/py310_check); the encoder's round trips on real models are in
tests/unit/server/test_delta_encoder.py."""

from __future__ import annotations

import hashlib
import io
import lzma

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import delta as fmt


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def apply(patch: bytes, base: bytes, target_sha: str, *, max_size: int = 1 << 30, piece: int = 7) -> bytes:
    out = io.BytesIO()
    pieces = [patch[i : i + piece] for i in range(0, len(patch), piece)]
    fmt.apply_patch(pieces, io.BytesIO(base), out, base_sha256=sha(base), target_sha256=target_sha, max_size=max_size)
    return out.getvalue()


def test_grouped_float_ops_round_trip() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=4096).astype(np.float32).tobytes()
    target = (np.frombuffer(base, np.float32) * np.float32(1.001)).tobytes()
    for tag in (fmt.OP_XOR, fmt.OP_ADD):
        data = fmt.diff_xor(base, target, 4) if tag == fmt.OP_XOR else fmt.diff_add(base, target, 4)
        op = fmt.Op(tag, len(target), 0, 4 | fmt.GROUPED, fmt.group_bytes(data, 4))
        patch = fmt.build_patch(fmt.DeltaHeader(len(target), len(base)), [op])
        assert apply(patch, base, sha(target), piece=1000) == target


def test_operation_past_base_is_refused() -> None:
    base = b"a" * 100
    patch = fmt.build_patch(fmt.DeltaHeader(50, len(base)), [fmt.Op(fmt.OP_COPY, 50, 80)])
    with pytest.raises(fmt.DeltaError, match="past the base"):
        apply(patch, base, sha(b"a" * 50))


def test_writes_past_target_size_are_refused() -> None:
    base = b"a" * 100
    patch = fmt.build_patch(fmt.DeltaHeader(10, len(base)), [fmt.Op(fmt.OP_COPY, 50, 0)])
    with pytest.raises(fmt.DeltaError, match="past the target size"):
        apply(patch, base, sha(b"a" * 10))


def test_zlit_round_trip_and_corruption() -> None:
    base = b"graph-node-" * 500
    target = base[:2000] + b"NEW" + base[2000:4000]
    op = fmt.zlit(base, 0, 5500, target)
    assert len(op.data) < 100
    patch = fmt.build_patch(fmt.DeltaHeader(len(target), len(base)), [op])
    assert apply(patch, base, sha(target)) == target
    bad = fmt.build_patch(
        fmt.DeltaHeader(len(target), len(base)), [fmt.Op(fmt.OP_ZLIT, len(target), 0, 5500, b"\x00" * 9)]
    )
    with pytest.raises(fmt.DeltaError, match="ZLIT"):
        apply(bad, base, sha(target))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bodies_fail_cleanly(body: bytes) -> None:
    base = bytes(range(256)) * 4
    patch = fmt.DeltaHeader(64, len(base)).pack() + lzma.compress(
        body, format=lzma.FORMAT_RAW, filters=list(fmt.FILTERS)
    )
    with pytest.raises(fmt.DeltaError):
        apply(patch, base, sha(b"\x00" * 64))


def test_vector_applies() -> None:
    """tests/vectors/delta_v1.json (every operation; docs/protocol.md §8.1) produces its target."""
    import base64
    import json
    from pathlib import Path

    vec = json.loads((Path(__file__).parents[2] / "vectors" / "delta_v1.json").read_text())
    base, patch = base64.b64decode(vec["base_b64"]), base64.b64decode(vec["patch_b64"])
    assert sha(base) == vec["base_sha256"] and patch[:4] == b"EFD1"
    out = apply(patch, base, vec["target_sha256"])
    assert len(out) == vec["target_size"]
