"""Build time: the static int8 calibration methods after the first are skipped when the first misses the
gate by more than other methods move fidelity (the reason goes into the candidate, hence the provenance)."""

from __future__ import annotations

from server.compression.gate import Fidelity, GateSpec, shortfall
from server.compression.pipeline import BuildOptions, Candidate, _method_skip
from server.compression.recipes import plan
from server.profiles import load_profiles


def _fid(metric: str, value: float, reference: float | None = None) -> Fidelity:
    return Fidelity(metric, value, reference, value, value, value, 0.1)


def _static(profile: str) -> dict[str, Candidate]:
    recipes = plan(load_profiles()[profile], "onnx", ops=frozenset({"Conv"}), has_calibration=True)
    return {r.name: Candidate(r, "failed") for r in recipes if r.kind == "static"}


def test_other_methods_are_skipped_only_when_the_first_is_far_below_the_gate() -> None:
    gate, opts = GateSpec(metric="iou"), BuildOptions()
    cands = _static("x86-64-vnni")
    minmax = cands["int8-static-minmax"]
    far = Candidate(minmax.recipe, "failed", fidelity=_fid("iou", 0.944))  # PP-OCRv4 det: 0.026 short
    near = Candidate(minmax.recipe, "failed", fidelity=_fid("iou", 0.955))
    reason = _method_skip(cands["int8-static-percentile"].recipe, [far], gate, opts)
    assert reason is not None and "0.026 below the gate" in reason and "int8-static-minmax" in reason
    assert _method_skip(cands["int8-static-entropy"].recipe, [far], gate, opts) is not None
    assert _method_skip(cands["int8-static-percentile"].recipe, [near], gate, opts) is None
    # per-tensor weights are skipped on the same grounds; the first method itself is always made
    assert _method_skip(cands["int8-static-pertensor"].recipe, [far], gate, opts) is not None
    assert _method_skip(cands["int8-static-pertensor"].recipe, [near], gate, opts) is None
    assert _method_skip(minmax.recipe, [far], gate, opts) is None
    # a minmax made for another flavour (the Pis' S8S8) says nothing about this one
    pi_minmax = _static("raspberry-pi-4")["int8-static-minmax"]
    pi_far = Candidate(pi_minmax.recipe, "failed", fidelity=_fid("iou", 0.5))
    assert _method_skip(cands["int8-static-percentile"].recipe, [pi_far], gate, opts) is None
    # an error (no fidelity) skips nothing; the option turns it off
    assert _method_skip(cands["int8-static-percentile"].recipe, [Candidate(minmax.recipe, "error", "boom")],
                        gate, opts) is None
    assert _method_skip(cands["int8-static-percentile"].recipe, [far], gate,
                        BuildOptions(method_skip_gap=None)) is None


def test_shortfall_is_in_the_metrics_units() -> None:
    assert abs(shortfall(_fid("top1", 0.95), GateSpec(metric="top1")) - 0.04) < 1e-9
    assert shortfall(_fid("cosine", 0.999), GateSpec(metric="cosine")) < 0
    # accuracy: the floor is fp32's accuracy less the relative budget
    assert abs(shortfall(_fid("accuracy", 0.90, reference=0.99), GateSpec(metric="accuracy")) - 0.0801) < 1e-9
