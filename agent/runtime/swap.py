"""Serving and swapping: serve the committed version, warm up, switch, probation, commit, restore."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from agent.core.health import ProbationPolicy, StatsLike, WindowStats
from agent.core.journal import Failure as LifecycleFailure
from agent.core.journal import State
from agent.core.lifecycle import Event, Failed, Fallback, RolledBack, Sample, WarmedUp
from agent.errors import EdgeError, HealthCheckError, MemoryBudgetError, StorageError, VersionNotKeptError
from agent.protocol.messages import HealthSpec, ModelRef
from agent.runtime import faults
from agent.runtime.heap import settle_heap
from agent.runtime.measuring import Measuring
from agent.runtime.parts import _peak_rss_bytes, _ref, _ref_text, _reset_peak_rss, _rss_bytes, _window
from agent.runtime.reporting import Reporting

log = logging.getLogger("agent")


class Swapping(Reporting, Measuring):
    """The executors that touch the serving model (ServeCommitted, LoadCandidate, SwitchTo, Commit, Restore)."""

    def _serve_committed(self, ref: ModelRef | None, *, fallback: bool) -> Event | None:
        candidates: list[ModelRef] = [] if ref is None or fallback else [ref]
        candidates += [v.ref for v in self.store.kept() if v.ref != ref and v.ref not in candidates]
        reasons: list[str] = [f"{_ref_text(ref)} keeps failing at start"] if fallback and ref else []
        served: ModelRef | None = None
        for candidate in candidates:
            try:
                self._load_and_activate(candidate)
            except EdgeError as exc:
                log.warning("cannot serve %s: %s", _ref_text(candidate), exc.message)
                reasons.append(f"{_ref_text(candidate)}: {exc.message}")
                continue
            served = candidate
            break
        if served is not None:
            self._fix_store_pointer(served)
        if ref is None or served == ref:
            return None
        return Fallback(self.clock(), failed=ref, serving=served, reason="; ".join(reasons))

    def _fix_store_pointer(self, ref: ModelRef) -> None:
        """The journal names the committed version; make the store agree (a crash can fall in between)."""
        current = self.store.current()
        if current is not None and current.ref == ref and current.committed:
            return
        try:
            self.store.commit(ref)
        except StorageError as exc:
            log.warning("cannot update the store pointer: %s", exc.message)

    def _load_and_activate(self, ref: ModelRef) -> None:
        """Load a kept version, check it works (not its speed: the board may be busy), switch to it."""
        kept = self.store.find(ref)
        if kept is None:
            raise VersionNotKeptError(ref.name, ref.version)
        self.store.verify_file(kept)
        model = self.host.load(kept.path, ref=kept.ref, runtime=kept.runtime, variant=kept.variant)
        try:
            self.host.check(model, replace(kept.health, latency_budget_ms=0.0, warmup_runs=1))
        except EdgeError:
            self.host.unload(model)
            raise
        self.host.activate(model)

    def _load_candidate(self, target: ModelRef) -> Event:
        now = self.clock()
        kept = self.store.find(target)
        if kept is None:
            return Failed.unkept(now, target)
        self._make_room(kept.size, f"{_ref_text(target)} ({kept.size}-byte model file)")
        try:
            self.store.verify_file(kept)
            rss_before = _rss_bytes()
            _reset_peak_rss()
            model = self.host.load(kept.path, ref=kept.ref, runtime=kept.runtime, variant=kept.variant)
        except EdgeError as exc:
            return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "load"))
        rss_after = _rss_bytes()
        if rss_before is not None and rss_after is not None:
            try:
                self._check_memory_budget(
                    max(rss_after - rss_before, kept.size), f"{_ref_text(target)} once loaded"
                )
            except MemoryBudgetError as exc:
                self.host.unload(model)
                return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "memory"))
        health = self._scaled(kept.health)
        try:
            report = self.host.check(model, health)
        except HealthCheckError as exc:
            self.host.unload(model)
            return Failed(now, LifecycleFailure("warming", exc.code, exc.reason, exc.check))
        except EdgeError as exc:
            self.host.unload(model)
            return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "load"))
        rss_warm = _peak_rss_bytes()  # the high-water mark: a big tensor freed after the run still counts
        if rss_before is not None and rss_warm is not None:
            try:  # warm-up ran the model: what its intermediate tensors and arenas took counts too
                self._check_memory_budget(rss_warm - rss_before, f"{_ref_text(target)} once warmed up")
            except MemoryBudgetError as exc:
                self.host.unload(model)
                return Failed(now, LifecycleFailure("warming", exc.code, exc.message, "memory"))
        log.info("health check passed", extra={"fields": {"model": _ref_text(target), "report": repr(report)}})
        self._benchmark(model, kept.health, ref=target, artifact_id=kept.artifact_id, variant=kept.variant)
        self._candidate = model
        policy = ProbationPolicy.from_health_spec(health)
        return WarmedUp(self.clock(), policy, self._baseline(policy))

    def _check_memory_budget(self, candidate_bytes: int, what: str) -> None:
        """Refuse a candidate that, beside the committed model (kept loaded through probation), busts the budget.

        A warm standby counts too; when releasing it is what makes the candidate fit, it is released.
        """
        budget = self.config.models.memory_budget_bytes
        if not budget:
            return
        self._make_room(candidate_bytes, what)
        committed = self._committed_install()
        resident = (committed.size if committed is not None else 0) + self._warm_standby_bytes()
        if candidate_bytes + resident > budget:
            raise MemoryBudgetError(candidate_bytes + resident, budget, f"{what} beside the committed model")

    def _warm_standby_bytes(self) -> int:
        """What the warm standby counts against the memory budget: its model file's size (0 when none)."""
        if self._standby is None or not self._standby_warm:
            return 0
        kept = self.store.find(self._standby.ref)
        return kept.size if kept is not None else 0

    def _make_room(self, candidate_bytes: int, what: str) -> None:
        """Release the warm standby when the candidate fits the memory budget without it and not with it."""
        budget = self.config.models.memory_budget_bytes
        standby_bytes = self._warm_standby_bytes()
        if not budget or not standby_bytes:
            return
        committed = self._committed_install()
        resident = committed.size if committed is not None else 0
        if candidate_bytes + resident + standby_bytes > budget >= candidate_bytes + resident:
            log.info(
                "releasing the warm standby to make room",
                extra={
                    "fields": {
                        "standby": _ref_text(self._standby.ref),
                        "candidate": what,
                        "budget": budget,
                        "standby_bytes": standby_bytes,
                    }
                },
            )
            self._release_standby()

    def _standby_fits(self, committed: ModelRef, standby: ModelRef) -> bool:
        """Whether ``standby`` may stay loaded beside ``committed``: kept on disk and within the memory budget."""
        kept_standby = self.store.find(standby)
        if kept_standby is None:
            return False
        budget = self.config.models.memory_budget_bytes
        if not budget:
            return True
        kept_committed = self.store.find(committed)
        return kept_standby.size + (kept_committed.size if kept_committed is not None else 0) <= budget

    def _scaled(self, health: HealthSpec) -> HealthSpec:
        """The server's health spec with its latency budget times ``lifecycle.latency_scale`` (1 leaves it as is)."""
        scale = self.config.lifecycle.latency_scale
        if scale == 1.0 or health.latency_budget_ms <= 0:
            return health
        return replace(health, latency_budget_ms=health.latency_budget_ms * scale)

    def _baseline(self, policy: ProbationPolicy) -> StatsLike | None:
        active = self.host.active
        if active is None:
            return None
        window = max(policy.window_s, 30.0)
        stats = _window(
            self.host.stats(since=self.host.now() - window, version=active.ref.version, name=active.ref.name)
        )
        measured = self._measured.get(active.ref)
        if (stats.requests == 0 or stats.p95_ms is None) and measured is not None:
            # no recent traffic on the serving version: its own benchmark on this device is the baseline
            return WindowStats(requests=measured.runs, p50_ms=measured.p50_ms, p95_ms=measured.p95_ms)
        return stats

    def _switch_to(self, target: ModelRef) -> Event | None:
        if self._candidate is None or self._candidate.ref != target:
            return Failed(self.clock(), LifecycleFailure("probation", "model", "the candidate is not loaded", "load"))
        if self._standby is not None:  # a warm standby of an older version: the one now serving takes its place
            log.info("releasing the warm standby", extra={"fields": {"standby": _ref_text(_ref(self._standby))}})
            self._release_standby()
        previous = self.host.activate(self._candidate, keep_previous=True)
        self._standby = previous
        self._probation_since = self.host.now()
        log.info("switched", extra={"fields": {"model": _ref_text(target), "previous": _ref_text(_ref(previous))}})
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("switched")
        return None

    def _sample_probation(self) -> None:
        target = self.machine.record.target
        if self.machine.state is not State.PROBATION or target is None or self._probation_since is None:
            self._probation_next = None
            return
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("probation:sample")
        stats = self.host.stats(since=self._probation_since, version=target.version, name=target.name)
        self._feed(Sample(self.clock(), _window(stats)))

    def _commit(self, target: ModelRef) -> None:
        self._probation_next = None
        self._candidate = None
        if self._probation_since is not None:
            kept = self.store.find(target)
            self._report_service(
                target, kept.artifact_id if kept else None, kept.variant if kept else None, self._probation_since
            )
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("commit")
        try:
            self.store.commit(target)
        except StorageError as exc:
            log.warning("cannot mark %s committed in the store: %s", _ref_text(target), exc.message)
            self._error_event(exc.code, exc.message)
        standby = self._standby
        if standby is not None and _ref(self.host.active) == target:
            if self.config.models.warm_standby and self._standby_fits(target, standby.ref):
                self._standby_warm = True  # memory only: after a restart the committed version serves alone
                log.info("keeping the previous version loaded as a warm standby", extra={
                    "fields": {"model": _ref_text(target), "standby": _ref_text(standby.ref)}
                })
            else:
                self._release_standby()
        settle_heap()  # the new version's objects (and a first load's runtime modules) out of full collections

    def _release_standby(self) -> None:
        standby, self._standby = self._standby, None
        self._standby_warm = False
        if standby is not None and standby is not self.host.active:
            try:
                self.host.unload(standby)
            except EdgeError as exc:
                log.warning("cannot release the previous model: %s", exc.message)

    def _restore(self, target: ModelRef | None, discard: ModelRef | None, artifact_id: str | None) -> Event:
        self._probation_next = None
        if artifact_id is not None:
            self._discard_download(artifact_id)
        want = target or self.machine.record.committed
        served = self._ensure_serving(want)
        candidate, self._candidate = self._candidate, None
        if candidate is not None and candidate is not self.host.active:
            try:
                self.host.unload(candidate)
            except EdgeError as exc:
                log.warning("cannot unload the candidate: %s", exc.message)
        if not (self._standby_warm and served is not None and served == self.machine.record.committed):
            self._release_standby()  # a warm standby stays when the committed version serves on (a failed update)
        if discard is not None and discard != served:
            try:
                self.store.discard_staged(discard)
            except StorageError as exc:
                log.warning("cannot remove %s: %s", _ref_text(discard), exc.message)
        return RolledBack(self.clock(), served)

    def _ensure_serving(self, want: ModelRef | None) -> ModelRef | None:
        """Make ``want`` serve (standby first, then the store); else the committed one, else any kept one."""
        active = _ref(self.host.active)
        if want is None:
            if active is not None and active == self.machine.record.target:
                self.host.deactivate()  # a first-ever deploy failed after its switch: nothing else to serve
                return None
            return active
        if active == want:
            return want
        standby = self._standby
        if standby is not None and standby.ref == want and self._standby_healthy(standby):
            self.host.activate(standby)
            self._standby, self._standby_warm = None, False
            log.info("switched to the standby without loading", extra={"fields": {"model": _ref_text(want)}})
            return want
        committed = self.machine.record.committed
        options = [want] + [r for r in (committed,) if r is not None and r != want]
        options += [v.ref for v in self.store.kept() if v.ref not in options]
        for ref in options:
            if ref == active and ref != self.machine.record.target:
                return ref
            try:
                self._load_and_activate(ref)
            except EdgeError as exc:
                log.warning("cannot serve %s: %s", _ref_text(ref), exc.message)
                continue
            return ref
        return _ref(self.host.active)

    def _drop_unkept_standby(self) -> None:
        """A warm standby whose version left the store (purge, kept-version eviction) is released."""
        standby = self._standby
        if standby is not None and self._standby_warm and self.store.find(standby.ref) is None:
            log.info("releasing the warm standby: its version is no longer kept", extra={
                "fields": {"standby": _ref_text(standby.ref)}
            })
            self._release_standby()

    def _standby_healthy(self, standby: Any) -> bool:
        """A warm standby sat idle since its commit: check it still works before it serves (as a load from disk is).

        During probation the standby is the committed version that served a moment ago: no check.
        """
        if not self._standby_warm:
            return True
        kept = self.store.find(standby.ref)
        try:
            if kept is None:
                raise VersionNotKeptError(standby.ref.name, standby.ref.version)
            self.host.check(standby, replace(kept.health, latency_budget_ms=0.0, warmup_runs=1))
        except EdgeError as exc:
            log.warning("the warm standby fails its check: %s", exc.message, extra={
                "fields": {"model": _ref_text(standby.ref)}
            })
            self._release_standby()
            return False
        return True
