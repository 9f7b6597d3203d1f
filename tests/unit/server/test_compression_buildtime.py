"""Build-time savings that must not change a verdict: block-wise fidelity, the codec choice made once per file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from server.compression import codec, gate
from server.compression.gate import GateSpec, measure_fidelity
from server.compression.share import BuildShare


def _whole(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The comparison on whole float64 copies, as the gate made it before it went block by block."""
    ref = np.concatenate([o.reshape(len(o), -1).astype(np.float64) for o in reference], axis=1)
    cand = np.concatenate([o.reshape(len(o), -1).astype(np.float64) for o in candidate], axis=1)
    finite = bool(np.isfinite(cand).all())
    cand = np.nan_to_num(cand, nan=0.0, posinf=0.0, neginf=0.0)
    dots = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(norms > 0, dots / np.maximum(norms, 1e-30), np.where((ref == cand).all(axis=1), 1.0, 0.0))
    return cos, float(np.abs(ref - cand).max()) if finite else math.inf


@pytest.mark.parametrize("block_bytes", [1, 8 * 40 * 7, gate.BLOCK_BYTES])
def test_block_wise_fidelity_equals_the_whole_array_comparison(monkeypatch: pytest.MonkeyPatch,
                                                                block_bytes: int) -> None:
    rng = np.random.default_rng(3)
    reference = [rng.random((9, 4, 7), dtype=np.float32), rng.random((9, 12), dtype=np.float32)]
    candidate = [o + rng.normal(0, 0.05, o.shape).astype(np.float32) for o in reference]
    candidate[0][2] = reference[0][2]  # an exact sample
    reference[1][4], candidate[1][4] = 0, 0
    reference[0][4], candidate[0][4] = 0, 0  # an all-zero sample: cosine 1 by equality
    monkeypatch.setattr(gate, "BLOCK_BYTES", block_bytes)
    cos, max_abs = gate._compare(reference, candidate, 9, True)
    want_cos, want_abs = _whole(reference, candidate)
    assert np.array_equal(cos, want_cos) and max_abs == want_abs
    assert cos[4] == 1.0 and cos[2] < 1.0
    fid = measure_fidelity(reference, candidate, GateSpec(metric="cosine"), None)
    assert fid.min_cosine == float(want_cos.min()) and fid.max_abs_error == want_abs

    candidate[1][7, 3] = np.nan  # not finite: cosine 0 everywhere, max error infinite, as before
    fid = measure_fidelity(reference, candidate, GateSpec(metric="cosine"), None)
    assert fid.min_cosine == 0.0 and fid.max_abs_error == math.inf


def test_the_codec_is_chosen_once_per_file_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = codec.choose_codec

    def counted(data: bytes) -> codec.CodecChoice:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(codec, "choose_codec", counted)
    with BuildShare.open(tmp_path) as share:
        a = share.codec_choice(bytes(50_000))
        assert share.codec_choice(bytes(50_000)) == a and calls == [50_000]
        b = share.codec_choice(b"\x01" * 50_000)  # other content: chosen again
        assert calls == [50_000, 50_000] and b.compression == "lzma"
