"""Latency decisions against fp32 come from interleaved timings (server/compression/retime.py).

The runners here advance a simulated clock by a scripted cost per request, so a "load spike" is
a fact of the test, not of the machine: nothing is timed for real.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agent.protocol.messages import TensorSpec
from server.compression import retime
from server.compression.gate import Scored, select
from server.compression.pipeline import Candidate
from server.compression.recipes import FP16_WEIGHTS, Recipe

FEED = {"x": np.zeros((1, 4), np.float32)}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedRunner:
    """Each request costs ``ms``, plus ``spike_ms`` for the requests numbered in ``spiked``."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (1, 4)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (1, 4)),)

    def __init__(self, clock: Clock, ms: float, spiked: set[int] | None = None, spike_ms: float = 0.0) -> None:
        self.clock, self.ms, self.spiked, self.spike_ms, self.calls = clock, ms, spiked or set(), spike_ms, 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        extra = self.spike_ms if self.calls in self.spiked else 0.0
        self.calls += 1
        self.clock.now += (self.ms + extra) / 1000.0
        return [feeds["x"]]


def test_paired_ratio_survives_a_spike_that_hits_whole_rounds_of_one_side() -> None:
    clock = Clock()
    # the candidate is really 0.8x fp32; a spike covers every request of its first two rounds (after warm-up)
    cand = ScriptedRunner(clock, 8.0, spiked=set(range(retime.WARMUP, retime.WARMUP + 2 * retime.RUNS)),
                          spike_ms=50.0)
    ref = ScriptedRunner(clock, 10.0)
    timing = retime.paired(cand, ref, FEED, clock=clock)
    assert timing.rounds == retime.ROUNDS
    assert abs(timing.median_ratio - 0.8) < 1e-9  # two spiked rounds of seven: the median is unmoved
    assert abs(timing.best_ratio - 0.8) < 1e-9
    assert cand.calls == ref.calls == retime.WARMUP + retime.ROUNDS * retime.RUNS


def test_paired_stops_adding_rounds_after_its_budget_once_the_minimum_is_done() -> None:
    clock = Clock()
    timing = retime.paired(ScriptedRunner(clock, 900.0), ScriptedRunner(clock, 1000.0), FEED, clock=clock,
                           budget_s=1.0)
    assert timing.rounds == retime.MIN_ROUNDS
    assert abs(timing.median_ratio - 0.9) < 1e-9


def _candidate(name: str, recipe: Recipe, *, passed: bool, latency: float, path: str) -> Candidate:
    return Candidate(recipe if recipe.name == name else Recipe(name, recipe.precision, recipe.kind, recipe.params),
                     "passed" if passed else "failed", None if passed else "below the gate", Path(path), None,
                     1000, 900, latency, 13, f"sha-{name}", 0.1, latency)


def test_a_passing_int8_candidate_that_a_spike_made_look_slow_is_retimed_and_chosen() -> None:
    clock = Clock()
    int8_recipe = Recipe("int8-static-minmax", "int8", "static", {"method": "minmax"})
    fp32 = _candidate("fp32", Recipe("fp32", "fp32", "fp32"), passed=True, latency=10.0, path="/m/fp32.onnx")
    fp32 = Candidate(fp32.recipe, "passed", None, fp32.path, None, 4000, 3600, 10.0, 13, "sha-fp32", 0.1, 10.0)
    # timed once after it was made, during a spike: 2x fp32, so the selection would set it aside
    int8 = _candidate("int8-static-minmax", int8_recipe, passed=True, latency=20.0, path="/m/int8.onnx")
    failing = _candidate("int8-static-entropy", int8_recipe, passed=False, latency=20.0, path="/m/ent.onnx")
    half = _candidate("fp16-weights", FP16_WEIGHTS, passed=True, latency=30.0, path="/m/fp16w.onnx")
    costs = {"fp32.onnx": 10.0, "int8.onnx": 7.0}
    opened: list[str] = []

    def open_runner(path: Path) -> ScriptedRunner:
        opened.append(path.name)
        return ScriptedRunner(clock, costs[path.name])

    def scored(cs: list[Candidate]) -> list[Scored]:
        return [Scored(c.recipe.name, c.passed, c.compressed_estimate, c.latency_best_ms, 0.999,
                       c.recipe.fp32_compute) for c in cs]

    before = [fp32, int8, failing, half]
    picked = select(scored(before), fp32.latency_best_ms)
    assert picked is not None and picked.name == "fp16-weights"  # the one-shot timing set int8 aside
    cache: dict[tuple[str, str], retime.PairedTiming] = {}
    notes: list[str] = []
    after = retime.retime_against_fp32(before, fp32, open_runner=open_runner, feed=lambda _r: FEED, cache=cache,
                                       notes=notes, clock=clock)
    # only the passing int8 candidate was re-timed; fp32-compute and failing ones are untouched
    assert sorted(opened) == ["fp32.onnx", "int8.onnx"]
    assert after[0] is fp32 and after[2] is failing and after[3] is half
    assert after[1].latency_best_ms is not None and abs(after[1].latency_best_ms - 7.0) < 1e-9
    assert after[1].latency_ms is not None and abs(after[1].latency_ms - 7.0) < 1e-9
    assert notes and notes[0].startswith("int8-static-minmax: timed in alternation with fp32") and "0.70x" in notes[0]
    picked = select(scored(after), fp32.latency_best_ms)
    assert picked is not None and picked.name == "int8-static-minmax"  # the same size class, now not "slow"
    # a second profile of the same build (same files) takes the cached timing: nothing is opened again
    opened.clear()
    again = retime.retime_against_fp32(before, fp32, open_runner=open_runner, feed=lambda _r: FEED, cache=cache,
                                       notes=notes, clock=clock)
    assert opened == [] and again[1].latency_best_ms == after[1].latency_best_ms and len(notes) == 1


def test_a_candidate_really_slower_than_fp32_stays_set_aside_after_retiming() -> None:
    clock = Clock()
    fp32 = Candidate(Recipe("fp32", "fp32", "fp32"), "passed", None, Path("/m/fp32.onnx"), None, 4000, 3600, 10.0,
                     13, "sha-fp32", 0.1, 10.0)
    slow = _candidate("int8-static-minmax", Recipe("int8-static-minmax", "int8", "static"), passed=True,
                      latency=15.0, path="/m/int8.onnx")
    costs = {"fp32.onnx": 10.0, "int8.onnx": 14.0}
    after = retime.retime_against_fp32([fp32, slow], fp32, open_runner=lambda p: ScriptedRunner(clock, costs[p.name]),
                                       feed=lambda _r: FEED, cache={}, notes=[], clock=clock)
    scored = [Scored(c.recipe.name, c.passed, c.compressed_estimate, c.latency_best_ms, 0.999, c.recipe.fp32_compute)
              for c in after]
    assert after[1].latency_best_ms is not None and abs(after[1].latency_best_ms - 14.0) < 1e-9
    picked = select(scored, fp32.latency_best_ms)
    assert picked is not None and picked.name == "fp32"


def test_the_benchmark_reports_best_of_and_paired_ratios_beside_the_median() -> None:
    from scripts.bench_compression import latency_figures, targets

    fp32 = [10.0, 10.0, 30.0, 10.0, 10.0]
    int8 = [7.0, 25.0, 21.0, 25.0, 7.0]  # rounds 2 and 4 hit by a spike on int8's side only
    fig = latency_figures(int8, fp32)
    assert fig["latency_ms"] == 21.0 and fig["latency_best_ms"] == 7.0
    assert abs(fig["latency_ratio"] - 2.1) < 1e-9  # median against median: the spike decides
    assert abs(fig["latency_best_ratio"] - 0.7) < 1e-9
    assert abs(fig["latency_paired_ratio"] - 0.7) < 1e-9  # ratios 0.7, 2.5, 0.7, 2.5, 0.7
    row = {"model": "m", "profile": "p", "variant": "edgefleet", "size_bytes": 1, "size_ratio": 0.3,
           "passed_gate": True, "precision": "int8", "fidelity": 1.0, **fig}
    summary = targets([row])
    assert summary["int8_at_most_0.8x_latency"] == [] and summary["int8_at_most_0.8x_latency_paired"] == ["m"]
