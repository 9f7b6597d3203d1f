"""Latency against fp32 from interleaved timings, so that a load spike does not decide a build.

Each candidate is timed once, after it is made (``runners.latency_ms``), each at its own moment of
the machine's load. On a shared build machine a spike during one candidate's runs made it look
slower than fp32 and the selection set it aside (PP-OCRv4 det: the passing int8 fallback came out
6.27 ms best against fp32's 4.14 ms, timed one after the other at load 14; the same two files timed
in alternation right after: 0.80x). So before the selection compares a candidate that computes in
int8 (or fp16) with fp32, the two are timed again in alternation: ``rounds`` rounds, each the best
of ``runs`` requests of one then the other (the order flips every round), and the decision takes
the median over rounds of the per-round ratio: both sides of each ratio saw the same load.

Candidates that compute with fp32's kernels (``Recipe.fp32_compute``) are never set aside on
latency, so they are not re-timed. The result is kept per pair of files (``cache``): profiles of
one build that share the candidate and the fp32 file share the timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from server.compression.runners import Runner


class _Recipe(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def fp32_compute(self) -> bool: ...


class _Timed(Protocol):
    """What re-timing reads of a pipeline candidate (``pipeline.Candidate``; a protocol, so that this
    module does not import the pipeline that calls it)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def passed(self) -> bool: ...
    @property
    def path(self) -> Path | None: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def latency_best_ms(self) -> float | None: ...
    @property
    def recipe(self) -> _Recipe: ...


Candidate = TypeVar("Candidate", bound=_Timed)

#: rounds of alternation, requests per side per round (best of), warm-up requests per side
ROUNDS = 7
RUNS = 3
WARMUP = 2
#: stop adding rounds after this many seconds once MIN_ROUNDS are done (a slow model on a busy box)
BUDGET_S = 4.0
MIN_ROUNDS = 3


@dataclass(frozen=True)
class PairedTiming:
    """One candidate timed in alternation with fp32."""

    rounds: int
    median_ratio: float  # median over rounds of (candidate best-of-round / fp32 best-of-round)
    best_ratio: float  # candidate's best over all rounds / fp32's best over all rounds
    candidate_best_ms: float
    fp32_best_ms: float

    def note(self, name: str) -> str:
        return (f"{name}: timed in alternation with fp32 ({self.rounds} rounds): {self.median_ratio:.2f}x "
                f"(median of paired rounds), {self.best_ratio:.2f}x best against best "
                f"({self.candidate_best_ms:.3g} vs {self.fp32_best_ms:.3g} ms)")


def _best_of(runner: Runner, feed: Mapping[str, np.ndarray], runs: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = clock()
        runner.run(feed)
        best = min(best, (clock() - t0) * 1000.0)
    return best


def paired(
    candidate: Runner,
    fp32: Runner,
    feed: Mapping[str, np.ndarray],
    *,
    rounds: int = ROUNDS,
    runs: int = RUNS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTiming:
    """Time ``candidate`` and ``fp32`` in alternation on the same feed; ratios are candidate / fp32."""
    for _ in range(WARMUP):
        candidate.run(feed)
        fp32.run(feed)
    cand_times: list[float] = []
    ref_times: list[float] = []
    deadline = clock() + budget_s
    for r in range(rounds):
        if r >= MIN_ROUNDS and clock() > deadline:
            break
        if r % 2:  # the order flips every round: neither side always runs on the other's cache state
            ref_times.append(_best_of(fp32, feed, runs, clock))
            cand_times.append(_best_of(candidate, feed, runs, clock))
        else:
            cand_times.append(_best_of(candidate, feed, runs, clock))
            ref_times.append(_best_of(fp32, feed, runs, clock))
    ratios = [c / f for c, f in zip(cand_times, ref_times, strict=True) if f > 0]
    return PairedTiming(
        rounds=len(cand_times),
        median_ratio=statistics.median(ratios) if ratios else 1.0,
        best_ratio=min(cand_times) / min(ref_times) if min(ref_times) > 0 else 1.0,
        candidate_best_ms=min(cand_times),
        fp32_best_ms=min(ref_times),
    )


def retime_against_fp32(
    candidates: Sequence[Candidate],
    fp32: Candidate,
    *,
    open_runner: Callable[[Path], Runner],
    feed: Callable[[Runner], Mapping[str, np.ndarray]],
    cache: MutableMapping[tuple[str, str], PairedTiming],
    notes: list[str],
    clock: Callable[[], float] = time.perf_counter,
) -> list[Candidate]:
    """The candidates, with every passing one that does not compute with fp32's kernels re-timed in
    alternation with ``fp32``: its latencies become fp32's scaled by the paired ratio (median latency
    and best alike), which is what the selection compares with fp32's. Others are returned as they are."""
    if fp32.path is None or fp32.latency_best_ms is None or fp32.latency_ms is None:
        return list(candidates)
    todo = {id(c) for c in candidates if c.passed and c is not fp32 and not c.recipe.fp32_compute
            and c.path is not None and c.latency_best_ms is not None}
    if not todo:
        return list(candidates)
    ref_runner: Runner | None = None
    out: list[Candidate] = []
    for c in candidates:
        if id(c) not in todo:
            out.append(c)
            continue
        assert c.path is not None
        key = (c.sha256 or str(c.path), fp32.sha256 or str(fp32.path))
        timing = cache.get(key)
        if timing is None:
            if ref_runner is None:
                ref_runner = open_runner(fp32.path)
            timing = cache[key] = paired(open_runner(c.path), ref_runner, feed(ref_runner), clock=clock)
        note = timing.note(c.recipe.name)
        if note not in notes:
            notes.append(note)
        out.append(replace(c, latency_ms=fp32.latency_ms * timing.median_ratio,
                           latency_best_ms=fp32.latency_best_ms * timing.median_ratio))
    return out
