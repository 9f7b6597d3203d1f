"""Probes: time candidate variants the server sends, off the serving path, and forget them (docs/protocol.md §4.6).

One probe at a time. First each variant is fetched: ChunkRequest for the whole artifact, chunks
authenticated one by one as they arrive (a forged chunk is dropped, never kept) and held in memory, both
digests checked, the model written under ``<store>/probe/``. Then every variant is timed in two mirrored
passes (forward, then backward, half the runs each, so drifting load biases none): loaded in a side slot
(the serving model is not touched) with ``lifecycle.probe_threads`` inference threads (1: no thread pool),
benchmarked within ``lifecycle.probe_cpu_share`` of one core, each run waiting until no application
request is in flight, unloaded. With one CPU thread each run is timed in that thread's CPU time (what the
model costs; the time the scheduler gave the serving threads is not counted), else in wall time. Loading,
timing and the fetched file's digests, decompression and write all run on one thread in ``SCHED_IDLE``
(``lifecycle.probe_priority``; Linux: it gets a CPU only when no normal thread wants it), so serving keeps
the CPU. Each is reported as a ``measurement`` with ``source: "probe"``, and the files are
deleted. Silence for ``transfer.chunk_timeout_s`` re-requests what is missing (doubling up to
``chunk_timeout_max_s``); after ``PROBE_RETRIES`` silent rounds the variant is given up (``probe.failed``).

Budgets: a variant bigger than ``models.max_artifact_bytes``, one that beside the committed model (and a
warm standby) would exceed ``models.memory_budget_bytes``, or one the disk cannot hold with
``min_free_bytes`` left is refused before it is fetched (``probe.failed`` says why). The probe is not in
the journal: its only state on disk is ``<store>/probe/``, which every start deletes, so a restart
(kill -9 included; fault point ``probe:stored``) forgets the probe without touching the serving model,
and the server's timeout names the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.lifecycle import Seen
from agent.errors import ArtifactTooLargeError, EdgeError, IntegrityError, MemoryBudgetError
from agent.protocol.codec import decompress
from agent.protocol.envelope import ChunkOpener, parse_chunk_header, unwrap_key
from agent.protocol.messages import ChunkRequest, Command, encode
from agent.protocol.probe import ProbeRequest, ProbeVariant
from agent.protocol.topics import Channel, device_topic
from agent.runtime import faults
from agent.runtime.inference import InferenceOptions
from agent.runtime.measuring import Measuring, at_low_priority
from agent.runtime.parts import _rss_bytes
from agent.runtime.reporting import Reporting

log = logging.getLogger("agent")

PROBE_RETRIES = 5
#: how long one probe run waits for the serving model to have no request in flight before it runs anyway
PROBE_YIELD_S = 0.05


@dataclass
class _Transfer:
    variant: ProbeVariant
    opener: ChunkOpener
    parts: dict[int, bytes] = field(default_factory=dict)
    last_new_at: float = 0.0
    timeout: float = 5.0
    retries: int = 0


@dataclass
class _ProbeJob:
    request: ProbeRequest
    command_id: str
    pending: list[ProbeVariant]
    transfer: _Transfer | None = None
    measured: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    ready: list[tuple[ProbeVariant, Path]] = field(default_factory=list)  # fetched and verified, on disk


class Probing(Reporting, Measuring):
    """The ``probe`` command's executor and its chunk intake."""

    _probe_job: _ProbeJob | None

    if TYPE_CHECKING:  # Swapping's, beside this class in Agent
        def _warm_standby_bytes(self) -> int: ...

    def _probe(self, cmd: Command, seen: Seen, request: ProbeRequest) -> None:
        """Start ``request`` (parsed by the intake) unless a probe is already running."""
        self._feed(seen)
        if self._probe_job is not None:
            self._command_result(cmd.command_id, "probe", ok=False,
                                 message=f"busy with probe {self._probe_job.request.probe_id}; send it again later")
            return
        self._probe_job = _ProbeJob(request, cmd.command_id, list(request.variants))
        self._command_result(cmd.command_id, "probe", ok=True,
                             message=f"probing {len(request.variants)} variant(s) of {request.model.name}")
        self._next_probe_variant()

    def _probe_dir(self) -> Path:
        return self.store.root / "probe"

    def _forget_probe_files(self) -> None:
        shutil.rmtree(self._probe_dir(), ignore_errors=True)

    def _next_probe_variant(self) -> None:
        job = self._probe_job
        if job is None:
            return
        while job.pending:
            variant = job.pending.pop(0)
            try:
                key = unwrap_key(variant.key, self.device_key, artifact_id=variant.artifact.artifact_id,
                                 device_id=self.device_id)
            except EdgeError as exc:
                self._probe_failed(variant, exc.message)
                continue
            info = variant.artifact
            try:
                self._probe_fits(variant)
            except EdgeError as exc:
                self._probe_failed(variant, exc.message)
                continue
            job.transfer = _Transfer(variant, ChunkOpener(key, info), last_new_at=self.monotonic(),
                                     timeout=self.config.transfer.chunk_timeout_s)
            if info.topic:
                self._subscribe(info.topic)
            self._request_probe_chunks(job.transfer, "initial")
            return
        self._measure_ready()
        self._finish_probe()

    def _probe_fits(self, variant: ProbeVariant) -> None:
        """Raise unless the variant fits the device's artifact cap, memory budget (beside what stays loaded:
        the committed model and a warm standby) and disk (its chunks and its file, ``min_free_bytes`` left)."""
        info, models = variant.artifact, self.config.models
        if max(info.size, info.compressed_size) > models.max_artifact_bytes:
            raise ArtifactTooLargeError(max(info.size, info.compressed_size), models.max_artifact_bytes)
        self._probe_memory(info.size, f"probe variant {variant.variant} ({info.size}-byte model file)")
        self.store.require_space(info.compressed_size + info.size, f"probe variant {variant.variant}")

    def _probe_memory(self, needed: int, what: str) -> None:
        """MemoryBudgetError when ``needed`` bytes beside the committed model and a warm standby bust the budget."""
        budget = self.config.models.memory_budget_bytes
        if not budget:
            return
        committed = self._committed_install()
        resident = (committed.size if committed is not None else 0) + self._warm_standby_bytes()
        if needed + resident > budget:
            raise MemoryBudgetError(needed + resident, budget, f"{what} beside the committed model")

    def _request_probe_chunks(self, t: _Transfer, reason: str) -> None:
        count = t.variant.artifact.chunk_count
        ranges: list[tuple[int, int]] = []
        start: int | None = None
        for i in range(count + 1):
            have = i == count or i in t.parts
            if not have and start is None:
                start = i
            elif have and start is not None:
                ranges.append((start, i))
                start = None
        if ranges:
            request = ChunkRequest(device_id=self.device_id, artifact_id=t.variant.artifact.artifact_id,
                                   ranges=tuple(ranges[:1024]), ts=self.clock(), reason=reason)
            self._publish(device_topic(self.device_id, Channel.CHUNK_REQUEST), encode(request))

    def _probe_chunk(self, payload: bytes) -> bool:
        """Take a chunk of the probe's current artifact; False when it belongs to something else."""
        job = self._probe_job
        t = job.transfer if job is not None else None
        if t is None:
            return False
        try:
            header = parse_chunk_header(payload)
        except EdgeError:
            return False
        if header.artifact_id != t.variant.artifact.artifact_id:
            return False
        try:
            index, plain = t.opener.open(payload)
        except EdgeError as exc:  # failed authentication, wrong length: dropped
            self._error_event(exc.code, f"dropped probe chunk {header.index}: {exc.message}")
            return True
        if index in t.parts:
            return True
        t.parts[index] = plain
        t.last_new_at = self.monotonic()
        t.timeout = self.config.transfer.chunk_timeout_s
        if len(t.parts) == t.variant.artifact.chunk_count:
            self._store_probe_variant(t)
        return True

    def _probe_timers(self, now: float) -> None:
        job = self._probe_job
        t = job.transfer if job is not None else None
        if t is None or now < t.last_new_at + t.timeout:
            return
        t.retries += 1
        if t.retries > PROBE_RETRIES:
            self._probe_failed(t.variant, f"no chunks after {PROBE_RETRIES} requests")
            self._end_transfer(t)
            self._next_probe_variant()
            return
        t.last_new_at = now
        t.timeout = min(t.timeout * 2, self.config.transfer.chunk_timeout_max_s)
        self._request_probe_chunks(t, "retry")

    def _end_transfer(self, t: _Transfer) -> None:
        if self._probe_job is not None:
            self._probe_job.transfer = None
        if t.variant.artifact.topic:
            with contextlib.suppress(EdgeError):
                if self.link is not None:
                    self.link.unsubscribe(t.variant.artifact.topic)

    def _store_probe_variant(self, t: _Transfer) -> None:
        job = self._probe_job
        assert job is not None
        self._end_transfer(t)
        info, variant = t.variant.artifact, t.variant
        folder = self._probe_dir()
        path = folder / f"{hashlib.sha256(variant.variant.encode()).hexdigest()[:16]}.{variant.runtime.format}"
        parts = [t.parts[i] for i in range(info.chunk_count)]
        t.parts.clear()

        def verify_and_write() -> None:  # digests, zlib and the write: CPU the serving threads must not wait for
            packed = b"".join(parts)
            parts.clear()
            if hashlib.sha256(packed).hexdigest() != info.compressed_sha256:
                raise IntegrityError("compressed artifact digest mismatch")
            model_bytes = decompress(packed, info.compression, expected_size=info.size)
            del packed
            if hashlib.sha256(model_bytes).hexdigest() != info.sha256:
                raise IntegrityError("model digest mismatch")
            folder.mkdir(mode=0o700, exist_ok=True)
            path.write_bytes(model_bytes)

        try:
            at_low_priority(verify_and_write, idle=self._probe_idle())
            job.ready.append((variant, path))
        except (EdgeError, OSError) as exc:
            self._probe_failed(variant, getattr(exc, "message", None) or str(exc))
            with contextlib.suppress(OSError):
                path.unlink()
        if faults.HOOK.armed is not None:
            faults.HOOK.reach("probe:stored")
        self._next_probe_variant()

    def _probe_idle(self) -> bool:
        return self.config.lifecycle.probe_priority == "idle"

    def _probe_options(self) -> InferenceOptions:
        """The probe's side session: ``lifecycle.probe_threads`` threads (0: the host's), one interpreter."""
        base = getattr(self.host, "options", None) or InferenceOptions()
        threads = self.config.lifecycle.probe_threads or base.intra_op_threads
        return dataclasses.replace(base, intra_op_threads=threads, inter_op_threads=1, litert_interpreters=1,
                                   allow_spinning=False)

    def _probe_time(self, variant: ProbeVariant, path: Path, runs: int) -> tuple[Any, list[float]]:
        """Load, time and unload one variant, all on one SCHED_IDLE thread; the (unloaded) model, its timings."""
        job = self._probe_job
        assert job is not None
        cfg = self.config.lifecycle

        def run() -> tuple[Any, list[float]]:
            rss_before = _rss_bytes()
            model = self.host.load(path, ref=job.request.model, runtime=variant.runtime, variant=variant.variant,
                                   options=self._probe_options())
            try:
                rss_after = _rss_bytes()
                if rss_before is not None and rss_after is not None:  # what loading it cost, as an update's load
                    self._probe_memory(max(rss_after - rss_before, variant.artifact.size),
                                       f"probe variant {variant.variant} once loaded")
                # one CPU thread: time what the run costs that thread, not the waits while serving had the CPU
                cpu_time = cfg.probe_threads == 1 and set(model.providers or ()) <= {"CPUExecutionProvider"}
                timings: list[float] = self.host.benchmark(
                    model, job.request.health, runs=runs, max_s=cfg.probe_max_s, cpu_share=cfg.probe_cpu_share,
                    yield_s=PROBE_YIELD_S, cpu_time=cpu_time)
                return model, timings
            finally:
                self.host.unload(model)

        return at_low_priority(run, idle=self._probe_idle())

    def _measure_ready(self) -> None:
        """Time every fetched variant in two passes, forward then backward, half the runs each.

        On a busy board the load drifts while one variant after another is timed; the mirrored order puts
        each variant on both sides of that drift, so a steady trend biases none of them.
        """
        job = self._probe_job
        assert job is not None
        timings: dict[str, list[float]] = {v.variant: [] for v, _ in job.ready}
        models: dict[str, Any] = {}
        runs = max(1, round(self.config.lifecycle.benchmark_runs / 2)) if self.config.lifecycle.benchmark_runs else 0
        started = time.monotonic()
        for variant, _ in job.ready if not runs else ():
            self._probe_failed(variant, "benchmarks are off here (lifecycle.benchmark_runs = 0)")
        for order in (job.ready, job.ready[::-1]) if runs else ():
            for variant, path in order:
                if variant.variant in job.failed:
                    continue
                try:
                    models[variant.variant], got = self._probe_time(variant, path, runs)
                except EdgeError as exc:
                    self._probe_failed(variant, exc.message)
                    continue
                if not got:
                    self._probe_failed(variant, "the benchmark could not run it")
                    continue
                timings[variant.variant] += got
        for variant, path in job.ready:
            with contextlib.suppress(OSError):
                path.unlink()
            if variant.variant in job.failed or not timings[variant.variant]:
                continue
            self._report_timings(models[variant.variant], timings[variant.variant], ref=job.request.model,
                                 artifact_id=variant.artifact.artifact_id, variant=variant.variant, source="probe",
                                 probe_id=job.request.probe_id, seconds=time.monotonic() - started)
            job.measured.append(variant.variant)
        job.ready.clear()

    def _probe_failed(self, variant: ProbeVariant, reason: str) -> None:
        job = self._probe_job
        if job is None:
            return
        job.failed[variant.variant] = reason
        self._event("probe.failed", severity="warning", message=f"probe of {variant.variant} failed: {reason}",
                    model=job.request.model, data={"probe_id": job.request.probe_id, "variant": variant.variant})

    def _finish_probe(self) -> None:
        job, self._probe_job = self._probe_job, None
        if job is None:
            return
        self._forget_probe_files()
        self._event("probe.completed", model=job.request.model,
                    message=f"probe {job.request.probe_id}: {len(job.measured)} measured, {len(job.failed)} failed",
                    data={"probe_id": job.request.probe_id, "measured": job.measured, "failed": job.failed})
