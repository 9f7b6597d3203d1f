"""Selection with the devices' own measurements (``gate.select(optimize=..., measured=...)``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.compression.gate import Scored, select
from server.errors import InvalidRequestError
from server.model_ops import build_options

# blind, the build machine thinks int8 is fast; on the devices it is the slowest
FP32 = Scored("fp32", True, 1000, 10.0, 1.0)
FP16W = Scored("fp16-weights", True, 520, 10.0, 1.0)
INT8 = Scored("int8-static", True, 300, 6.0, 0.99)
DYN = Scored("int8-dynamic", True, 400, 7.0, 0.995)
ALL = [FP32, FP16W, INT8, DYN]


def test_blind_balanced_is_the_size_first_rule() -> None:
    assert select(ALL, 10.0) == INT8
    assert select(ALL, 10.0, optimize="size") == INT8
    assert select(ALL, 10.0, optimize="latency") == INT8  # the fastest estimate


def test_balanced_pays_a_few_bytes_for_int8_compute_timed_here() -> None:
    # face_det's case: fp32-compute int8 weights are smallest, full int8 is 1.37x the bytes and 0.6x the time
    weights = Scored("int8-weights-searched", True, 590, 10.0, 0.995, fp32_compute=True)
    full = Scored("litert-static-wi8-ai8", True, 805, 6.0, 0.992)
    assert select([FP32, weights, full], 10.0) == full
    assert select([FP32, weights, full], 10.0, optimize="size") == weights
    # not a clear gain (0.85x), or too many bytes (1.6x): the size rule stands
    assert select([FP32, weights, Scored("a", True, 805, 8.5, 0.99)], 10.0) == weights
    assert select([FP32, weights, Scored("rec-like", True, 805, 7.9, 0.99)], 10.0) == weights  # within noise
    assert select([FP32, weights, Scored("b", True, 950, 5.0, 0.99)], 10.0) == weights
    # the same bytes (within SIZE_SLACK): a clear gain (<= 0.93x) wins over the size rule's fidelity order,
    # noise (0.95x) does not; face_mesh: full int8 1.004x the bytes, 0.83x the time, less faithful (0.9997 against 1.0)
    same = Scored("litert-static-wi8-ai8", True, 592, 8.3, 0.994)
    assert select([FP32, weights, same], 10.0) == same
    assert select([FP32, weights, same], 10.0, optimize="size") == weights
    assert select([FP32, weights, Scored("c", True, 592, 9.5, 0.994)], 10.0) == weights
    # just past SIZE_SLACK the clear-gain rule (0.75x) applies again
    assert select([FP32, weights, Scored("d", True, 660, 8.3, 0.994)], 10.0) == weights
    # a profile not timed here (no estimate): size first
    blind = [Scored(c.name, c.passed, c.ota_size, None, c.fidelity) for c in (FP32, weights, full)]
    assert select(blind, None).name == "int8-weights-searched"


def test_a_variant_measured_slower_than_fp32_is_never_chosen_whatever_the_policy() -> None:
    measured = {"fp32": 10.0, "int8-static": 14.0, "int8-dynamic": 10.3, "fp16-weights": 10.1}
    for optimize in ("balanced", "size", "latency"):
        picked = select(ALL, 10.0, optimize=optimize, measured=measured)
        assert picked is not None and picked.name != "int8-static", optimize
    # within the 5 % noise allowance int8-dynamic still counts as not slower, and it is the smallest left
    assert select(ALL, 10.0, optimize="size", measured=measured) == DYN


def test_balanced_takes_the_smallest_of_the_measured_fastest() -> None:
    measured = {"fp32": 10.0, "int8-static": 9.0, "int8-dynamic": 5.0, "fp16-weights": 5.2}
    assert select(ALL, 10.0, measured=measured) == DYN  # fp16-weights is as fast but bigger
    assert select(ALL, 10.0, optimize="latency", measured=measured) == DYN
    assert select(ALL, 10.0, optimize="size", measured=measured) == INT8  # size first, it is not slower than fp32


def test_measured_latency_ranks_unmeasured_candidates_last() -> None:
    measured = {"fp32": 10.0, "fp16-weights": 4.0}
    assert select(ALL, 10.0, optimize="latency", measured=measured) == FP16W


def test_one_measured_candidate_is_not_a_comparison() -> None:
    assert select(ALL, 10.0, measured={"int8-dynamic": 1.0}) == INT8
    assert select([INT8, Scored("x", False, 10, 1.0)], 10.0, measured={"fp32": 1.0, "int8-static": 50.0}) is None


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="optimize"):
        select(ALL, 10.0, optimize="speed")
    with pytest.raises(InvalidRequestError, match="optimize"):
        build_options({"profile": "x", "optimize": "speed"})
    assert build_options({"profile": "x", "optimize": "latency"}).optimize == "latency"
    assert build_options({"profile": "x"}).optimize == "balanced"


def test_build_command_line_carries_optimize_and_probe_into_the_request() -> None:
    from server.cli import build_parser
    from server.commands.models import _build_body

    args = build_parser().parse_args(["build", "digits:1", "--profile", "raspberry-pi-4", "--optimize", "latency",
                                      "--probe", "group:lab", "--probe-timeout", "30"])
    body = _build_body(args)
    assert (body["optimize"], body["probe"], body["probe_timeout_s"]) == ("latency", "group:lab", 30.0)
    plain = _build_body(build_parser().parse_args(["build", "digits:1", "--profile", "all"]))
    assert plain["optimize"] == "balanced" and "probe" not in plain
    from server import model_ops

    with pytest.raises(InvalidRequestError, match="needs the fleet"):
        model_ops.build_model(Path("/nonexistent"), "digits:1", {"profile": "a", "probe": "group:lab"})
    assert not Path("/nonexistent").exists()  # refused before anything was opened
