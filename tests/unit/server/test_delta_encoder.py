"""EFD1 delta patches: the server's encoder (server.delta) round-tripped through the agent's streaming apply,
on the real digits model."""

from __future__ import annotations

import io
import lzma

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.protocol import delta as fmt
from server.delta import delta_ops, make_delta, worth_sending
from tests.support.models import real_model
from tests.unit.protocol.test_delta import apply, sha


def retrain_head(path: str, seed: int = 3) -> bytes:
    """The digits model with its last Linear layer replaced (a new head on the same backbone)."""
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name.startswith("8."):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, 0.1, arr.shape).astype(arr.dtype), init.name))
    return model.SerializeToString()


@pytest.fixture(scope="module")
def digits() -> bytes:
    return real_model("digits").path.read_bytes()


def test_head_change_round_trips_and_is_small(digits: bytes) -> None:
    target = retrain_head(str(real_model("digits").path))
    patch = make_delta(digits, target, "onnx")
    assert apply(patch, digits, sha(target)) == target
    # the backbone is referenced, not sent: the patch is about the size of the new head (10x64 + 10 floats)
    assert len(patch) < 0.1 * len(lzma.compress(target))
    tags = {op.tag for op in delta_ops(digits, target, "onnx")}
    assert fmt.OP_COPY in tags


def test_identical_model_is_one_copy(digits: bytes) -> None:
    ops = fmt.merge_copies(delta_ops(digits, digits, "onnx"))
    assert [(op.tag, op.base_off, op.length) for op in ops] == [(fmt.OP_COPY, 0, len(digits))]


def test_unrelated_file_round_trips_and_is_not_worth_it(digits: bytes) -> None:
    target = np.random.default_rng(1).bytes(50_000)
    patch = make_delta(digits, target, "raw")
    assert apply(patch, digits, sha(target)) == target
    assert not worth_sending(len(patch), len(lzma.compress(target)))


def test_corrupted_base_is_refused_before_writing(digits: bytes) -> None:
    target = retrain_head(str(real_model("digits").path))
    patch = make_delta(digits, target, "onnx")
    bad = bytearray(digits)
    bad[1000] ^= 1
    out = io.BytesIO()
    with pytest.raises(fmt.DeltaError, match="base does not match"):
        fmt.apply_patch([patch], io.BytesIO(bytes(bad)), out, base_sha256=sha(digits), target_sha256=sha(target),
                        max_size=1 << 30)  # fmt: skip
    assert out.getvalue() == b""


def test_wrong_target_digest_and_size_cap(digits: bytes) -> None:
    target = retrain_head(str(real_model("digits").path))
    patch = make_delta(digits, target, "onnx")
    with pytest.raises(fmt.DeltaError, match="target digest"):
        apply(patch, digits, sha(b"something else"))
    with pytest.raises(fmt.DeltaError, match="exceeds the cap"):
        apply(patch, digits, sha(target), max_size=len(target) - 1)


def test_truncated_and_trailing_bytes(digits: bytes) -> None:
    target = retrain_head(str(real_model("digits").path))
    patch = make_delta(digits, target, "onnx")
    with pytest.raises(fmt.DeltaError):
        apply(patch[:-3], digits, sha(target))
    with pytest.raises(fmt.DeltaError, match="after"):
        apply(patch + b"x", digits, sha(target))
    with pytest.raises(fmt.DeltaError, match="magic"):
        apply(b"XXXX" + patch[4:], digits, sha(target))
