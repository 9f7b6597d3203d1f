"""ModelHost: loads models beside the one serving, checks them, swaps them in, serves requests.

Theory of operation
    Every loaded model lives in a *slot*: its runtime session, its state and a count of the
    requests currently inside it. States:

        standby  --activate-->  active  --activate(other)-->  draining  --(in-flight = 0)-->  released
           |                      |     --activate(other, keep_previous=True)-->  standby
           +------unload------>  draining / released                 deactivate(): active -> draining

    A request takes the active slot and increments its in-flight count under one short lock, runs
    outside the lock, and decrements the count under the lock again. ``activate`` swaps the active
    reference under that same lock: a request is either entirely on the old slot or entirely on the
    new one, and a draining slot is released by whichever thread brings its count to zero. So a swap
    never fails a request and never waits for one; the old session lives exactly as long as the
    requests that picked it.

    ``keep_previous=True`` keeps the replaced model loaded (standby) instead of draining it: the
    lifecycle can hold the last committed version warm during probation and switch back to it in
    microseconds, at the price of holding two sessions in memory for that window.

    Statistics: every request leaves one (time, latency, outcome) sample in the window of the version
    that served it (``agent.core.serving.StatsWindow``), appended under the same lock as the in-flight
    decrement, so the hot path costs two lock round-trips and a deque append.

Clock: ``since`` arguments and ``activated_at`` are in ``ModelHost.now()`` seconds (``time.monotonic``
unless another clock is injected).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import numpy as np

from agent.core.serving import HealthReport, Outcome, ServingStats, StatsWindow, percentile, summarize
from agent.errors import (
    HealthCheckError,
    InferenceError,
    InvalidInputError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from agent.protocol.messages import GoldenCase, HealthSpec, ModelRef, RuntimeSpec, TensorSpec
from agent.runtime.inference import InferenceOptions, Session, open_session
from agent.runtime.tensors import (
    all_finite,
    array_from_tensor,
    compare_golden,
    dtype_name,
    numpy_dtype,
    probe_array,
    shape_fits,
    shapes_compatible,
)

__all__ = ["HealthReport", "LoadedModel", "ModelHost", "Served", "ServingStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One loaded session of one version (contract: CONTRACTS.md section 6).

    ``inputs``/``outputs`` are as the runtime reports them; ``backend`` and ``providers`` say what
    actually runs it (after CPU fallback); ``load_id`` tells two loads of the same file apart.
    Compared by identity: each load is its own session, even of the same file.
    """

    ref: ModelRef
    variant: str | None
    runtime: RuntimeSpec
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    backend: str = ""
    providers: tuple[str, ...] = ()
    load_ms: float = 0.0
    load_id: int = 0


class Served(NamedTuple):
    """The outputs of one request and the model that produced them (it may have changed since)."""

    model: LoadedModel
    outputs: dict[str, np.ndarray]


class _State(Enum):
    STANDBY = "standby"
    ACTIVE = "active"
    DRAINING = "draining"
    RELEASED = "released"


class _Slot:
    __slots__ = ("inflight", "input_specs", "model", "session", "state")

    def __init__(self, model: LoadedModel, session: Session) -> None:
        self.model = model
        self.session = session
        self.state = _State.STANDBY
        self.inflight = 0
        self.input_specs = {s.name: (numpy_dtype(s.dtype).newbyteorder("="), s.shape) for s in model.inputs}


_load_ids = itertools.count(1)


class ModelHost:
    """Serves one active model at a time and swaps models without failing a request.

    Thread-safe: ``infer``/``run`` from any number of threads, management calls (``load``, ``check``,
    ``activate``, ``unload``) from any thread (they serialise among themselves).
    """

    def __init__(
        self,
        options: InferenceOptions | None = None,
        *,
        stats_capacity: int = 4096,
        stats_versions: int = 8,
        check_finite: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options or InferenceOptions()
        self.check_finite = check_finite
        self._clock = clock
        self._lock = threading.Lock()  # guards _active, slot states/in-flight counts, the stats window
        self._changed = threading.Condition(self._lock)
        self._admin = threading.RLock()  # serialises load/activate/unload/close
        self._slots: dict[int, _Slot] = {}
        self._active: _Slot | None = None
        self._activated_at: float | None = None
        self._window = StatsWindow(capacity=stats_capacity, max_versions=stats_versions)
        self._closed = False
        self._idle_waiters = 0  # benchmarks waiting for the serving model to have no request in flight

    # -- management ------------------------------------------------------------------------------

    def load(
        self, path: Path, *, ref: ModelRef, runtime: RuntimeSpec, variant: str | None = None,
        options: InferenceOptions | None = None,
    ) -> LoadedModel:
        """Load ``path`` beside the active model (which keeps serving); raises ModelLoadError.

        ``options`` replaces the host's for this session (a probe's side slot runs on one thread)."""
        if self._closed:
            raise ModelLoadError("model host is closed")
        started = self._clock()
        session = open_session(Path(path), runtime, options or self.options)
        load_ms = (self._clock() - started) * 1000.0
        model = LoadedModel(
            ref=ref,
            variant=variant,
            runtime=runtime,
            path=Path(path),
            inputs=session.inputs,
            outputs=session.outputs,
            backend=session.backend,
            providers=session.providers,
            load_ms=load_ms,
            load_id=next(_load_ids),
        )
        with self._admin:
            if self._closed:
                session.close()
                raise ModelLoadError("model host is closed")
            with self._lock:
                self._slots[model.load_id] = _Slot(model, session)
        log.info(
            "loaded %s v%d (%s, %s) in %.1f ms",
            ref.name,
            ref.version,
            session.backend,
            ",".join(model.providers),
            load_ms,
        )
        return model

    def check(self, model: LoadedModel, health: HealthSpec) -> HealthReport:
        """Warm up and health-check a loaded model; raises HealthCheckError(reason, check=...).

        Checks, in order: ``dtype``/``shape`` of the declared inputs against the model's; a priming run
        (``load`` if it raises); output dtypes and shapes against ``health.outputs`` (or the model's own
        declaration); ``finite`` float outputs on every run; ``latency`` p95 of ``warmup_runs`` timed runs
        against ``latency_budget_ms`` (<= 0 disables it; over it, a second round of runs is timed and the
        better round judged, so one scheduling hiccup does not fail a model); ``golden`` outputs within each
        case's atol/rtol.
        """
        slot = self._checkout(model)
        try:
            return self._check(slot, health)
        finally:
            self._checkin(slot, None)

    def activate(self, model: LoadedModel, *, keep_previous: bool = False) -> LoadedModel | None:
        """Make ``model`` the one serving: one atomic switch. Returns the model it replaced (or None).

        The replaced model finishes the requests already inside it and is released when they drain
        (or, with ``keep_previous=True``, stays loaded on standby for a fast switch back).
        """
        with self._admin:
            slot = self._slot_of(model)
            release: _Slot | None = None
            with self._lock:
                previous = self._active
                if previous is slot:
                    return None
                slot.state = _State.ACTIVE
                self._active = slot
                self._activated_at = self._clock()
                if previous is not None:
                    if keep_previous:
                        previous.state = _State.STANDBY
                    else:
                        release = self._retire_locked(previous)
                self._changed.notify_all()
            if release is not None:
                self._release(release)
            log.info(
                "activated %s v%d%s",
                model.ref.name,
                model.ref.version,
                f" (replacing v{previous.model.ref.version})" if previous else "",
            )
            return previous.model if previous else None

    def deactivate(self) -> LoadedModel | None:
        """Stop serving altogether (requests then get ModelNotReadyError); returns the model that was active."""
        with self._admin:
            release: _Slot | None = None
            with self._lock:
                previous = self._active
                if previous is None:
                    return None
                self._active = None
                release = self._retire_locked(previous)
                self._changed.notify_all()
            if release is not None:
                self._release(release)
            return previous.model

    def unload(self, model: LoadedModel) -> None:
        """Discard a model that is not active (loaded, failed its check, or kept on standby)."""
        with self._admin:
            slot = self._slots.get(model.load_id)
            if slot is None:
                return
            with self._lock:
                if slot.state is _State.ACTIVE:
                    raise ModelError(
                        f"{model.ref.name} v{model.ref.version} is serving: activate another or deactivate() first"
                    )
                release = self._retire_locked(slot)
            if release is not None:
                self._release(release)

    def close(self, *, drain_timeout_s: float = 5.0) -> None:
        """Stop serving, wait up to ``drain_timeout_s`` for requests in flight, release every session."""
        with self._admin:
            self._closed = True
            with self._lock:
                self._active = None
                for slot in self._slots.values():
                    if slot.state is not _State.RELEASED:
                        slot.state = _State.DRAINING
                self._changed.notify_all()
                deadline = self._clock() + drain_timeout_s
                while any(s.inflight for s in self._slots.values()):
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                idle = [s for s in self._slots.values() if s.inflight == 0 and s.state is not _State.RELEASED]
                for s in idle:
                    s.state = _State.RELEASED
            for s in idle:
                self._release(s)

    def __enter__(self) -> ModelHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------------------------

    @property
    def active(self) -> LoadedModel | None:
        slot = self._active
        return slot.model if slot is not None else None

    @property
    def activated_at(self) -> float | None:
        """``now()`` of the last switch (a probation window starts here)."""
        return self._activated_at

    def now(self) -> float:
        return self._clock()

    def wait_active(self, timeout: float | None = None) -> LoadedModel | None:
        """Block until some model is serving (or the timeout passes); returns it or None."""
        with self._changed:
            self._changed.wait_for(lambda: self._active is not None or self._closed, timeout)
            return self._active.model if self._active is not None else None

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the active model; raises InvalidInputError (bad tensors), InferenceError, ModelNotReadyError."""
        return self.run(inputs).outputs

    def run(self, inputs: Mapping[str, np.ndarray], *, name: str | None = None, version: int | None = None) -> Served:
        """Like ``infer``, but says which model served, and may insist on a model ``name``/``version``
        (checked in the same atomic step that picks the model: ModelNotFoundError if it is not the active one)."""
        with self._lock:
            slot = self._active
            if slot is None:
                raise ModelNotReadyError("model host is closed" if self._closed else "no model is being served yet")
            ref = slot.model.ref
            if (name is not None and name != ref.name) or (version is not None and version != ref.version):
                wanted = f"{name or ref.name}" + (f" version {version}" if version is not None else "")
                raise ModelNotFoundError(
                    f"{wanted} is not being served (serving {ref.name} version {ref.version})",
                    name=name or ref.name,
                    version=version,
                )
            slot.inflight += 1
        outcome = Outcome.REJECTED
        started = self._clock()
        try:
            feeds = self._validate(slot, inputs)
            outcome = Outcome.ERROR
            outputs = slot.session.run(feeds)
            outcome = Outcome.NONFINITE if self.check_finite and not all_finite(outputs) else Outcome.OK
            return Served(slot.model, outputs)
        finally:
            self._checkin(slot, (ref, started, outcome))

    def stats(self, *, since: float | None = None, version: int | None = None, name: str | None = None) -> ServingStats:
        """Requests, errors and latency percentiles over the window (per version, or all together)."""
        with self._lock:
            samples, older, truncated = self._window.select(since=since, version=version, name=name)
        return summarize(samples, older=older, truncated=truncated)

    def loaded(self) -> list[LoadedModel]:
        """Every model holding a session (active, standby, draining)."""
        with self._lock:
            return [s.model for s in self._slots.values() if s.state is not _State.RELEASED]

    # -- internals -------------------------------------------------------------------------------

    def _slot_of(self, model: LoadedModel) -> _Slot:
        slot = self._slots.get(model.load_id)
        if slot is None or slot.state in (_State.DRAINING, _State.RELEASED) or slot.model is not model:
            raise ModelError(f"{model.ref.name} v{model.ref.version} is not loaded in this host (released or unloaded)")
        return slot

    def _checkout(self, model: LoadedModel) -> _Slot:
        with self._admin, self._lock:
            slot = self._slot_of(model)
            slot.inflight += 1
            return slot

    def _checkin(self, slot: _Slot, sample: tuple[ModelRef, float, Outcome] | None) -> None:
        now = self._clock()
        with self._lock:
            if sample is not None:
                ref, started, outcome = sample
                self._window.record(ref, now, (now - started) * 1000.0, outcome)
            slot.inflight -= 1
            release = slot.state is _State.DRAINING and slot.inflight == 0
            if release:
                slot.state = _State.RELEASED
            if slot.inflight == 0 and (self._closed or (self._idle_waiters and slot is self._active)):
                self._changed.notify_all()
        if release:
            self._release(slot)

    def _retire_locked(self, slot: _Slot) -> _Slot | None:
        """Mark a slot draining; returns it if it can be released right away (caller releases outside the lock)."""
        if slot.state is _State.RELEASED:
            return None
        if slot.inflight == 0:
            slot.state = _State.RELEASED
            return slot
        slot.state = _State.DRAINING
        return None

    def _release(self, slot: _Slot) -> None:
        slot.session.close()
        with self._lock:
            self._slots.pop(slot.model.load_id, None)
        log.info("released %s v%d", slot.model.ref.name, slot.model.ref.version)

    @staticmethod
    def _validate(slot: _Slot, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        specs = slot.input_specs
        if len(inputs) != len(specs):
            ModelHost._explain(specs, inputs)
        for name, (dtype, shape) in specs.items():
            array = inputs.get(name)
            if (
                array is None
                or not isinstance(array, np.ndarray)
                or array.dtype != dtype
                or len(array.shape) != len(shape)
                or any(d not in (-1, a) for a, d in zip(array.shape, shape, strict=True))
            ):
                ModelHost._explain(specs, inputs)
        return inputs

    @staticmethod
    def _explain(
        specs: Mapping[str, tuple[np.dtype[np.generic], tuple[int, ...]]], inputs: Mapping[str, object]
    ) -> None:
        """Raise the InvalidInputError that says what is wrong (off the hot path)."""
        for name in inputs:
            if name not in specs:
                raise InvalidInputError(f"model has no input {name!r} (inputs: {', '.join(specs)})", tensor=name)
        for name, (dtype, shape) in specs.items():
            array = inputs.get(name)
            if array is None:
                raise InvalidInputError(f"input {name!r} is missing", tensor=name)
            if not isinstance(array, np.ndarray):
                raise InvalidInputError(f"input {name!r} must be a numpy array", tensor=name)
            if array.dtype != dtype:
                raise InvalidInputError(
                    f"input {name!r} must be {dtype_name(dtype)}, got {dtype_name(array.dtype)}", tensor=name
                )
            if not shape_fits(array.shape, shape):
                raise InvalidInputError(
                    f"input {name!r} has shape {list(array.shape)}, model expects {list(shape)} (-1 = any)",
                    tensor=name,
                )
        raise InvalidInputError("inputs do not fit the model")  # pragma: no cover - one of the above applies

    def benchmark(
        self,
        model: LoadedModel,
        health: HealthSpec,
        *,
        runs: int,
        max_s: float,
        cpu_share: float = 1.0,
        yield_s: float = 0.0,
        cpu_time: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> list[float]:
        """Time up to ``runs`` runs of a loaded (not active) model off the serving path; their ms, sorted.

        The inputs are the health check's (the build's golden sample, else synthetic ones of the declared
        shapes). Two untimed runs first; it stops at ``max_s`` of wall time; after each run it sleeps so
        that it takes at most ``cpu_share`` of the time (what serving keeps). With ``yield_s`` > 0, each run
        waits (up to ``yield_s``) until no application request is in flight on the active model, so it does
        not start beside one. ``cpu_time``: each run is the calling thread's CPU time, not wall time (only
        for a session that computes on that thread alone: one thread, CPU); a run the scheduler preempts for
        the serving threads then measures what the model costs, not how busy the device was. Raises
        HealthCheckError as ``check`` does when the model cannot run.
        """
        slot = self._checkout(model)
        try:
            feeds = self._probe_feeds(model, health)
            for _ in range(2):
                self._timed_run(slot, feeds, "benchmark warm-up run")
            deadline = self._clock() + max_s
            timings: list[float] = []
            while len(timings) < runs and self._clock() < deadline:
                if yield_s > 0:
                    self._wait_serving_idle(yield_s)
                cpu_started = time.thread_time()
                _, ms = self._timed_run(slot, feeds, "benchmark run")
                if cpu_time:
                    ms = (time.thread_time() - cpu_started) * 1000.0
                timings.append(ms)
                if cpu_share < 1.0:
                    sleep(ms / 1000.0 * (1.0 - cpu_share) / cpu_share)
            return sorted(timings)
        finally:
            self._checkin(slot, None)

    def _wait_serving_idle(self, timeout: float) -> bool:
        """Block until the active model has no request in flight (or ``timeout``); whether it is idle."""
        with self._changed:
            self._idle_waiters += 1
            try:
                return self._changed.wait_for(
                    lambda: self._active is None or self._active.inflight == 0 or self._closed, timeout)
            finally:
                self._idle_waiters -= 1

    def _timed_run(
        self, slot: _Slot, feeds: Mapping[str, np.ndarray], what: str
    ) -> tuple[dict[str, np.ndarray], float]:
        started = self._clock()
        try:
            outputs = slot.session.run(feeds)
        except InferenceError as exc:
            raise HealthCheckError(f"{what} failed: {exc.message}", check="load") from exc
        return outputs, (self._clock() - started) * 1000.0

    def _warm_up(self, slot: _Slot, feeds: Mapping[str, np.ndarray], runs: int, what: str) -> list[float]:
        """``runs`` timed runs, each checked for finite outputs; their times in ms, sorted."""
        timings: list[float] = []
        for run in range(runs):
            outputs, ms = self._timed_run(slot, feeds, f"{what} {run + 1}")
            self._check_finite(outputs, f"{what} {run + 1}")
            timings.append(ms)
        return sorted(timings)

    def _check(self, slot: _Slot, health: HealthSpec) -> HealthReport:
        model = slot.model
        feeds = self._probe_feeds(model, health)
        checks: list[str] = []
        outputs, first_ms = self._timed_run(slot, feeds, "priming run")
        checks.append("load")
        self._check_outputs(model, health, outputs)
        checks += ["dtype", "shape", "finite"]

        timings = self._warm_up(slot, feeds, health.warmup_runs, "warm-up run") or [first_ms]
        runs = 1 + health.warmup_runs
        p95 = percentile(timings, 95)
        budget = health.latency_budget_ms
        if budget > 0:
            if p95 > budget:
                # With a handful of runs the p95 is the slowest one, and one scheduling hiccup on a busy
                # board (or a CPU hog) makes it: measure again before calling the model slow. A slow model
                # is slow on every run, so it fails both rounds.
                again = self._warm_up(slot, feeds, max(1, health.warmup_runs), "confirming run")
                runs += len(again)
                if percentile(again, 95) < p95:
                    timings, p95 = again, percentile(again, 95)
            if p95 > budget:
                raise HealthCheckError(
                    f"p95 latency {p95:.1f} ms over the {budget:g} ms budget, measured twice "
                    f"({len(timings)} runs, fastest {timings[0]:.1f} ms)",
                    check="latency",
                )
            checks.append("latency")

        worst: float | None = None
        for index, case in enumerate(health.golden):
            err = self._check_golden(slot, index, case)
            worst = err if worst is None else max(worst, err)
        if health.golden:
            checks.append("golden")
        return HealthReport(
            ref=model.ref,
            checks=tuple(checks),
            runs=runs + len(health.golden),
            first_run_ms=first_ms,
            p50_ms=percentile(timings, 50),
            p95_ms=p95,
            max_ms=timings[-1],
            golden_cases=len(health.golden),
            golden_max_abs_err=worst,
        )

    @staticmethod
    def _probe_feeds(model: LoadedModel, health: HealthSpec) -> dict[str, np.ndarray]:
        declared = {s.name: s for s in health.inputs}
        actual = {s.name: s for s in model.inputs}
        for spec in health.inputs:
            have = actual.get(spec.name)
            if have is None:
                raise HealthCheckError(
                    f"model has no input {spec.name!r} (it has {', '.join(actual) or 'none'})", check="shape"
                )
            if have.dtype != spec.dtype:
                raise HealthCheckError(f"input {spec.name!r} is {have.dtype}, expected {spec.dtype}", check="dtype")
            if not shapes_compatible(have.shape, spec.shape):
                raise HealthCheckError(
                    f"input {spec.name!r} has shape {list(have.shape)}, expected {list(spec.shape)}", check="shape"
                )
        if health.golden and set(health.golden[0].inputs) == set(actual):
            # a real sample the build recorded: values the model accepts (a sample rate, a token id, a
            # state), where synthetic ones may not be; its outputs are checked later as golden case 0
            try:
                return {name: array_from_tensor(t) for name, t in health.golden[0].inputs.items()}
            except ValueError:
                pass  # a malformed case fails its own golden check below
        feeds: dict[str, np.ndarray] = {}
        for index, have in enumerate(model.inputs):
            want = declared.get(have.name)
            # the declared probe shape wins; where it leaves a dimension open, the model's own size is used
            shape = (
                tuple(d if d != -1 else m for d, m in zip(want.shape, have.shape, strict=True))
                if want is not None
                else have.shape
            )
            feeds[have.name] = probe_array(TensorSpec(have.name, have.dtype, shape), seed=index)
        return feeds

    def _check_outputs(self, model: LoadedModel, health: HealthSpec, outputs: Mapping[str, np.ndarray]) -> None:
        for spec in health.outputs or model.outputs:
            array = outputs.get(spec.name)
            if array is None:
                raise HealthCheckError(
                    f"model does not produce output {spec.name!r} (it produces {', '.join(outputs) or 'nothing'})",
                    check="shape",
                )
            got = dtype_name(array.dtype)
            if got != spec.dtype:
                raise HealthCheckError(f"output {spec.name!r} is {got}, expected {spec.dtype}", check="dtype")
            if not shape_fits(array.shape, spec.shape):
                raise HealthCheckError(
                    f"output {spec.name!r} has shape {list(array.shape)}, expected {list(spec.shape)}", check="shape"
                )
        self._check_finite(outputs, "priming run")

    @staticmethod
    def _check_finite(outputs: Mapping[str, np.ndarray], what: str) -> None:
        for name, array in outputs.items():
            if array.dtype.kind == "f":
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                if bad:
                    raise HealthCheckError(
                        f"{what}: output {name!r} has {bad} non-finite values of {array.size}", check="finite"
                    )

    def _check_golden(self, slot: _Slot, index: int, case: GoldenCase) -> float:
        try:
            inputs = {name: array_from_tensor(t) for name, t in case.inputs.items()}
            expected = {name: array_from_tensor(t) for name, t in case.outputs.items()}
            feeds = self._validate(slot, inputs)
        except (ValueError, InvalidInputError) as exc:
            raise HealthCheckError(f"golden case {index} does not fit the model: {exc}", check="golden") from exc
        try:
            outputs = slot.session.run(feeds)
        except InferenceError as exc:
            raise HealthCheckError(f"golden case {index} failed to run: {exc.message}", check="golden") from exc
        mismatch, worst = compare_golden(outputs, expected, atol=case.atol, rtol=case.rtol)
        if mismatch is not None:
            raise HealthCheckError(f"golden case {index}: {mismatch.reason}", check="golden")
        return worst
