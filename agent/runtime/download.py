"""The download path: open the transfer, take chunks, keep resume snapshots, verify and install."""

from __future__ import annotations

import logging
from pathlib import Path

from agent.core.journal import Failure as LifecycleFailure
from agent.core.lifecycle import DownloadComplete, Event, Failed, Verified
from agent.core.reassembly import Reassembly, Taken, progress_due, take_chunk
from agent.errors import (
    ArtifactTooLargeError,
    EdgeError,
    IntegrityError,
    StorageError,
    TopicError,
)
from agent.protocol.envelope import ChunkOpener, unwrap_key
from agent.protocol.events import EventKind
from agent.protocol.messages import ChunkRequest, DesiredState, ModelRef, encode
from agent.protocol.topics import Channel, device_topic, parse_topic
from agent.runtime import delta as delta_rt
from agent.runtime import faults
from agent.runtime.download_state import SNAPSHOT_EVERY_BYTES, SNAPSHOT_EVERY_S, Download, _write_snapshot
from agent.runtime.parts import _need, _ref_text
from agent.runtime.reporting import Reporting

log = logging.getLogger("agent")


class Downloads(Reporting):
    """The transfer executors (StartDownload, DiscardDownload, Verify) and chunk intake."""

    def _start_download(self, target: ModelRef, artifact_id: str, *, resume: bool) -> Event | None:
        try:
            download = self._open_download(target, artifact_id)
        except EdgeError as exc:
            return Failed(self.clock(), LifecycleFailure("downloading", exc.code, exc.message))
        self._download = download
        if download.info.topic:
            self._subscribe(download.info.topic)
        progress = download.reassembly.progress()
        self._event(
            EventKind.DOWNLOAD_STARTED,
            model=target,
            deployment_id=download.desired.deployment_id,
            data={
                "received": progress.received,
                "total": progress.total,
                "bytes": progress.bytes_received,
                "total_bytes": progress.total_bytes,
                "resumed": bool(resume and progress.received),
            },
        )
        if download.reassembly.complete:
            return self._download_complete(download)
        self._request_missing(download, "resume" if resume and progress.received else "initial")
        return None

    def _subscribe(self, topic: str) -> None:
        assert self.link is not None
        try:
            parsed = parse_topic(topic)
        except TopicError:
            log.warning("ignoring artifact topic %r outside the edgefleet tree", topic)
            return
        if parsed.channel is Channel.ARTIFACT:
            self.link.subscribe(topic)

    def _open_download(self, target: ModelRef, artifact_id: str) -> Download:
        desired = self.trusted.reopen(self.store.load_desired(artifact_id), self.clock())
        info, key = desired.artifact, desired.key
        if info is None or key is None or info.artifact_id != artifact_id or desired.model != target:
            raise IntegrityError(f"stored desired state does not describe artifact {artifact_id}")
        limit = self.config.models.max_artifact_bytes
        if info.size > limit:
            raise ArtifactTooLargeError(info.size, limit)
        self._check_memory_budget(info.size, f"{_ref_text(target)} ({info.size}-byte model file)")
        use, why = delta_rt.plan(desired, self.store, artifact_id=artifact_id,
                                 max_ratio=self.config.transfer.delta_max_ratio)
        if why is not None:
            self._delta_fallback(target, desired, artifact_id, why)
        partial = self.store.partial(info)
        if use is not None:
            info, key, partial = use.offer.artifact, use.offer.key, delta_rt.partial(self.store, artifact_id, use.offer)
        data_key = unwrap_key(key, self.device_key, artifact_id=info.artifact_id, device_id=self.device_id)
        reassembly = Reassembly.for_artifact(info, max_bytes=limit)
        snapshot = partial.read_snapshot()
        if snapshot is not None:
            try:
                reassembly.restore(snapshot)
            except StorageError as exc:
                log.warning("resume snapshot unusable (%s); starting the transfer over", exc.message)
        missing = info.compressed_size - reassembly.progress().bytes_received
        target_bytes = use.offer.target_size if use is not None else 0  # a delta's applied file, before install
        self.store.require_space(missing + info.size + target_bytes, f"downloading {_ref_text(target)}")
        partial.open()
        return Download(
            target=target,
            desired=desired,
            info=info,
            opener=ChunkOpener(data_key, info),
            reassembly=reassembly,
            partial=partial,
            last_new_at=self.monotonic(),
            timeout=self.config.transfer.chunk_timeout_s,
            last_snapshot_at=self.monotonic(),
            last_progress_at=self.monotonic(),
            artifact_id=artifact_id,
            delta=use,
        )

    def _request_missing(self, download: Download, reason: str) -> None:
        ranges = download.reassembly.missing_ranges()
        if not ranges:
            return
        request = ChunkRequest(
            device_id=self.device_id,
            artifact_id=download.info.artifact_id,
            ranges=ranges,
            ts=self.clock(),
            reason=reason,
        )
        self._publish(device_topic(self.device_id, Channel.CHUNK_REQUEST), encode(request))

    def _on_chunk(self, payload: bytes) -> None:
        d = self._download
        if d is None or d.complete:
            return
        taken = take_chunk(payload, d.opener, d.reassembly, d.partial)
        if isinstance(taken.error, StorageError):  # the disk failed: the download fails (not a bad chunk)
            self._feed(Failed(self.clock(), LifecycleFailure("downloading", taken.error.code, taken.error.message)))
            return
        if taken.error is not None:
            self._error_event(taken.error.code, taken.note)
        if taken.outcome is not Taken.NEW:
            return
        if faults.HOOK.armed is not None:
            faults.HOOK.reach(f"download:chunk:{d.reassembly.progress().received}")
        now = self.monotonic()
        d.last_new_at = now
        d.timeout = self.config.transfer.chunk_timeout_s
        d.unsnapshotted += len(taken.data)
        if d.reassembly.complete:
            if (done := self._download_complete(d)) is not None:
                self._feed(done)
            return
        self._snapshot(d)
        self._progress(d, now)

    def _snapshot(self, d: Download, *, force: bool = False) -> None:
        """Persist the resume state when due (see SNAPSHOT_EVERY_*); ``force`` writes it now and waits.

        A due snapshot is written on a worker thread so chunk handling goes on during the fsyncs. It is
        still sound: the bitmap is taken here, after every chunk it names was written (pwrite, on this
        thread), and the worker fsyncs the data file before it writes the snapshot. One at a time: while
        one is in flight, a due snapshot waits for a later chunk.
        """
        now = self.monotonic()
        due = d.unsnapshotted >= SNAPSHOT_EVERY_BYTES or now - d.last_snapshot_at >= SNAPSHOT_EVERY_S
        if not d.unsnapshotted or not (force or due):
            return
        if not force and d.snapshot_job is not None and not d.snapshot_job.done():
            return
        self._settle_snapshot(d)
        blob = d.reassembly.to_bytes()
        d.unsnapshotted = 0
        d.last_snapshot_at = now
        if force:
            _write_snapshot(d.partial, blob)
        else:
            d.snapshot_job = self._snapshots.submit(_write_snapshot, d.partial, blob)

    @staticmethod
    def _settle_snapshot(d: Download) -> None:
        """Wait for a background snapshot of ``d`` (before its partial is closed, discarded or verified)."""
        job, d.snapshot_job = d.snapshot_job, None
        if job is not None:
            job.result()

    def _progress(self, d: Download, now: float) -> None:
        """``download.progress`` per quarter, at most every ``progress_interval_s`` (``progress_due``): per-10%
        events cost a fleet of a thousand ~3 KB per device and rollout (docs/benchmarks.md, bench_fleet)."""
        p = d.reassembly.progress()
        if not progress_due(d.last_progress_fraction, p.fraction, now - d.last_progress_at,
                            self.config.transfer.progress_interval_s):
            return
        d.last_progress_fraction, d.last_progress_at = p.fraction, now
        self._event(
            EventKind.DOWNLOAD_PROGRESS,
            model=d.target,
            deployment_id=d.desired.deployment_id,
            data={"received": p.received, "total": p.total, "bytes": p.bytes_received, "total_bytes": p.total_bytes},
        )

    def _download_complete(self, d: Download) -> Event | None:
        # The data is made durable before the journal can say "downloaded" (DownloadComplete), but the resume
        # snapshot is not rewritten (its temp file and directory fsyncs took 10-25 ms of every transfer): after a
        # restart, verification finds the data complete by its SHA-256 whatever the restored bitmap says
        # (Reassembly.finish). A background snapshot still in flight finishes on its own.
        try:
            d.partial.sync()
        except StorageError as exc:
            log.warning("cannot make the downloaded data durable: %s", exc.message)
        d.unsnapshotted = 0
        d.complete = True
        if d.info.topic and self.link is not None:
            self.link.unsubscribe(d.info.topic)
        if d.delta is not None and not self._apply_delta(d):
            return self._start_download(d.target, d.artifact_id, resume=False)  # the full artifact now
        p = d.reassembly.progress()
        self._event(
            EventKind.DOWNLOAD_COMPLETED,
            model=d.target,
            deployment_id=d.desired.deployment_id,
            data={"received": p.received, "total": p.total, "bytes": p.bytes_received, "total_bytes": p.total_bytes},
        )
        return DownloadComplete(self.clock())

    def _discard_download(self, artifact_id: str) -> None:
        d = self._download
        if d is not None and d.artifact_id == artifact_id:
            self._settle_snapshot(d)
            d.partial.close()
            if d.info.topic and self.link is not None:
                self.link.unsubscribe(d.info.topic)
            self._download = None
        try:
            self.store.discard_partial(artifact_id)
        except StorageError as exc:
            log.warning("cannot remove partial download %s: %s", artifact_id, exc.message)

    def _verify(self, target: ModelRef, artifact_id: str) -> Event:
        d = self._download
        try:
            if d is None or d.artifact_id != artifact_id:  # after a restart in verifying
                d = self._open_download(target, artifact_id)
            self._settle_snapshot(d)
            d.reassembly.finish(d.partial)
            info, source = d.info, d.partial.data_path
            if d.delta is not None:  # the applied target (re-applied if a restart lost it), copied and re-hashed
                info, source = delta_rt.as_installable(_need(d.desired.artifact)), self._delta_target(d)
            self.store.install(
                ref=target,
                info=info,
                runtime=_need(d.desired.runtime),
                health=_need(d.desired.health),
                variant=d.desired.variant,
                source=source,
            )
        except EdgeError as exc:
            return Failed(self.clock(), LifecycleFailure("verifying", exc.code, exc.message))
        finally:
            if d is not None:
                d.partial.close()
        self._download = None
        self._discard_download(artifact_id)
        return Verified(self.clock())

    # delta updates (agent/runtime/delta.py)

    def _delta_target(self, d: Download) -> Path:
        target = delta_rt.target_path(self.store, d.artifact_id)
        if target.is_file():
            return target
        assert d.delta is not None
        return delta_rt.apply(self.store, d.artifact_id, d.partial.data_path, d.delta,
                              max_size=self.config.models.max_artifact_bytes)

    def _apply_delta(self, d: Download) -> bool:
        """Apply the completed patch; False (after reporting and marking the fallback) if the full artifact must
        be downloaded instead."""
        assert d.delta is not None
        t0 = self.monotonic()
        try:
            d.reassembly.finish(d.partial)
            self._delta_target(d)
        except EdgeError as exc:
            self._settle_snapshot(d)
            d.partial.close()
            self._download = None
            self._delta_fallback(d.target, d.desired, d.artifact_id, f"{exc.code}: {exc.message}")
            return False
        full = _need(d.desired.artifact)
        self._event(EventKind.DELTA_APPLIED, model=d.target, deployment_id=d.desired.deployment_id, data={
            "base_version": d.delta.offer.base_version, "delta_bytes": d.info.compressed_size,
            "full_bytes": full.compressed_size, "apply_s": round(self.monotonic() - t0, 4)})
        return True

    def _delta_fallback(self, target: ModelRef, desired: DesiredState, artifact_id: str, reason: str) -> None:
        """Report (event ``delta.fallback``) and remember (``delta.failed``) that this deploy goes full."""
        log.warning("delta for %s not used: %s; downloading the full artifact", _ref_text(target), reason)
        try:
            delta_rt.mark_failed(self.store, artifact_id, reason)
        except OSError as exc:
            log.warning("cannot record the delta fallback: %s", exc)
        offer = desired.extra.get("delta")
        size = offer.get("artifact", {}).get("compressed_size") if isinstance(offer, dict) else None
        full = desired.artifact
        self._event(EventKind.DELTA_FALLBACK, model=target, deployment_id=desired.deployment_id, data={
            "reason": reason[:300], "delta_bytes": size, "full_bytes": full.compressed_size if full else None})
