"""The off-path benchmark (ModelHost.benchmark) and probation's baseline from the device's own measurement."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from agent.core.health import Outcome, ProbationPolicy, WindowStats, decide
from agent.protocol.measurement import Measurement
from agent.protocol.messages import ModelRef, RuntimeSpec
from agent.runtime.host import ModelHost
from agent.runtime.inference import InferenceOptions
from agent.runtime.swap import Swapping
from tests.support.devices.fixtures import models
from tests.support.models.agent import AgentModels

__all__ = ["models"]

REF = ModelRef("digits", 1)
ONNX = RuntimeSpec("onnx", "onnxruntime")


def test_benchmark_runs_off_path_within_its_runs_and_cpu_share(models: AgentModels) -> None:
    slept: list[float] = []
    with ModelHost(InferenceOptions(intra_op_threads=1)) as host:
        model = host.load(models.good, ref=REF, runtime=ONNX)
        timings = host.benchmark(model, models.health(), runs=7, max_s=30.0, cpu_share=0.25, sleep=slept.append)
        assert len(timings) == 7 and timings == sorted(timings) and timings[0] > 0
        # after each run it rests three times as long as the run took: a quarter of one core at most
        assert sorted(s * 1000 / 3 for s in slept) == pytest.approx(timings)
        assert host.active is None  # never switched in
        assert host.stats(version=1, name="digits").requests == 0  # and never counted as serving traffic
        assert host.benchmark(model, models.health(), runs=1000, max_s=0.0) == []  # the wall-time cap holds


def test_probation_baseline_is_the_devices_own_benchmark_when_the_old_version_had_no_traffic(
    models: AgentModels,
) -> None:
    with ModelHost(InferenceOptions(intra_op_threads=1)) as host:
        host.activate(host.load(models.good, ref=REF, runtime=ONNX))
        measured = Measurement(device_id="d", ts=0.0, model="digits", version=1, source="warmup", runs=20,
                               p50_ms=0.5, p95_ms=0.8)
        shell = SimpleNamespace(host=host, _measured={REF: measured})
        policy = ProbationPolicy(window_s=1.0, max_latency_regression=1.5)
        baseline = Swapping._baseline(shell, policy)  # type: ignore[arg-type]
        assert baseline == WindowStats(requests=20, p50_ms=0.5, p95_ms=0.8)
        slow = WindowStats(requests=50, errors=0, p50_ms=30.0, p95_ms=40.0)
        verdict = decide(policy, started_at=0.0, now=10.0, candidate=slow, baseline=baseline)
        assert verdict.outcome is Outcome.FAIL and verdict.check == "latency" and "previous version" in verdict.reason
        # with real traffic on the serving version, that traffic is the baseline
        for _ in range(5):
            host.infer({models.input_name: np.zeros((1, 1, 8, 8), np.float32)})
        served = Swapping._baseline(shell, policy)  # type: ignore[arg-type]
        assert served is not None and served.requests == 5


def test_the_benchmark_thread_runs_at_low_priority_and_hands_errors_back() -> None:
    import os
    import threading

    from agent.runtime.measuring import BENCHMARK_NICE, at_low_priority

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = at_low_priority(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert seen == max(own, BENCHMARK_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller's own is untouched

    def boom() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        at_low_priority(boom)


def test_a_probe_thread_runs_in_sched_idle_and_the_caller_keeps_its_policy() -> None:
    import os
    import threading

    from agent.runtime.measuring import at_low_priority

    own = os.sched_getscheduler(threading.get_native_id())
    policy = at_low_priority(lambda: os.sched_getscheduler(threading.get_native_id()), idle=True)
    assert policy == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) == own


def test_cpu_time_benchmark_leaves_out_the_time_the_thread_was_not_running(models: AgentModels) -> None:
    """``cpu_time`` counts what each run costs the (one) inference thread. The host's wall clock here jumps a
    second at every reading, as if the scheduler had given the CPU to the serving threads for a second in the
    middle of each run: wall timings say 1000 ms, CPU timings what the model computed."""
    ticks = iter(range(10**6))

    with ModelHost(InferenceOptions(intra_op_threads=1), clock=lambda: float(next(ticks))) as host:
        model = host.load(models.good, ref=REF, runtime=ONNX)
        wall = host.benchmark(model, models.health(), runs=5, max_s=1e9)
        cpu = host.benchmark(model, models.health(), runs=5, max_s=1e9, cpu_time=True)
    assert wall == [1000.0] * 5
    assert len(cpu) == 5 and all(0 < t < 100 for t in cpu), cpu


def test_benchmark_runs_wait_while_an_application_request_is_in_flight(models: AgentModels) -> None:
    """With ``yield_s`` a run does not start while the serving model has a request in flight."""
    import threading

    with ModelHost(InferenceOptions(intra_op_threads=1)) as host:
        host.activate(host.load(models.good, ref=REF, runtime=ONNX))
        side = host.load(models.good_v2, ref=ModelRef("digits", 2), runtime=ONNX)
        active = host.active
        assert active is not None
        slot = host._checkout(active)  # a request in flight on the serving model, held by this test
        done = threading.Event()
        out: list[list[float]] = []

        def bench() -> None:
            out.append(host.benchmark(side, models.health(), runs=3, max_s=30.0, yield_s=30.0))
            done.set()

        worker = threading.Thread(target=bench)
        worker.start()
        try:
            assert not done.wait(1.0)  # every run waits for the serving model to be idle (up to yield_s)
        finally:
            host._checkin(slot, None)  # the request completes: the waiting run is woken and goes on
        assert done.wait(30.0) and len(out[0]) == 3
        worker.join()
        assert host.stats(version=1, name="digits").requests == 0
