"""``edgefleet server run``: one server process (registry, broker link, ingest, chunk server,
rollout driver, outbox, HTTP API and /metrics), built from the config and stopped cleanly.

Threads (none per device): paho's network loop, the ingest writer, the chunk sender, the
control loop (rollout driver + outbox + housekeeping, woken early whenever the API or the
ingest changed something), and the HTTP API (uvicorn's event loop thread plus a bounded pool of
worker threads for the handlers, ``server.asgi``). Several processes may
share a registry and a broker: leases split the rollouts and the outbox between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from agent.protocol.messages import ChunkRequest
from server.api import Api
from server.artifacts import ArtifactStore
from server.asgi import ApiHttpServer
from server.build_ops import default_build_source
from server.builds import BuildSource
from server.chunks import ChunkServer
from server.config import RUNTIME_FILE, BrokerSection, ServerConfig
from server.errors import ServerError
from server.fanout import SYS_TOPICS, FanoutPace
from server.identity import server_logins
from server.ingest import Ingestor
from server.keys import atomic_write, load_signing_key, peer_broker_passwords, read_token_file
from server.metrics import Family, PublishStats, render_metrics
from server.outbox import Outbox, safe_flush
from server.publisher import MqttLink
from server.quotas import CHUNK_RESENDS
from server.registry.fleet import open_registry
from server.rollout.driver import Dispatcher, RolloutDriver
from server.rollout.progress import ProgressTracker
from server.service import FleetService, ProfileSource
from server.shards import ShardedLink
from server.signing import Signer
from server.takeover import SessionTakeover

log = logging.getLogger("edgefleet.server")

HOUSEKEEPING_EVERY_S = 5.0


def instance_id(config: ServerConfig) -> str:
    if config.server.instance_id:
        return config.server.instance_id
    digest = hashlib.sha256(str(config.home.resolve()).encode()).hexdigest()[:6]
    return f"{socket.gethostname()}-{digest}"


class FleetServer:
    def __init__(
        self,
        config: ServerConfig,
        *,
        builds: BuildSource | None = None,
        profiles: ProfileSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.instance = instance_id(config)
        self.owner = f"{self.instance}:{os.getpid()}:{secrets.token_hex(3)}"
        peers = peer_broker_passwords(config.paths, config.broker.peer_logins)  # before anything is opened
        self.registry = open_registry(config)
        self.signer = Signer(load_signing_key(config.paths))
        self.artifacts = ArtifactStore(config.paths.artifacts_dir, self.registry)
        self.builds = builds or default_build_source(config.home)
        self.publish_stats = PublishStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None

        b = config.broker
        password = read_token_file(config.resolve(b.password_file)) if b.password_file else None
        self.progress = ProgressTracker(clock)
        self.ingest = Ingestor(
            self.registry, self.progress, bucket_s=config.retention.telemetry_bucket_s,
            on_chunk_request=self._on_chunk_request, on_written=self._on_ingest_written, clock=clock,
            quotas=config.quotas, reserved_logins=server_logins(b.username) | frozenset(b.peer_logins),
        )

        # a broker that binds client id to login (peer_logins set): the client id is the login, and a dead peer's
        # session is taken over with its own login (passwords read first thing: a missing one stops the start)
        client_id = b.username if b.peer_logins else (b.client_id or f"edgefleet-server-{self.instance}")

        p = config.publisher
        pace = FanoutPace.for_settings(p.broadcast, p.broadcast_egress_mb_s, p.broadcast_max_lead_kib)

        def make_link(url: str, peer: str | None = None) -> MqttLink:
            where = BrokerSection(url=url)
            source = f"{where.host}:{where.port}"
            return MqttLink(
                host=where.host, port=where.port, client_id=peer or client_id,
                username=(peer if peer in peers else b.username) or None,
                password=peers.get(peer or "", password),
                ca_cert=str(config.resolve(b.ca_cert)) if b.ca_cert else None,
                tls=where.tls, keepalive_s=b.keepalive_s, max_inflight=config.publisher.max_inflight,
                shared_subscriptions=b.shared_subscriptions, on_message=self.ingest.submit,
                subscribe=peer is None, reconnect=peer is None,
                # a dead peer's session taken over only drains: the pace samples the broker on our own link
                sys_topics=SYS_TOPICS if pace is not None and peer is None else (),
                on_sys=lambda topic, payload: self.chunks.observe_broker(source, topic, payload),
            )

        # several independent brokers: one link to each, device topics routed by shard (server/shards.py)
        self.link: MqttLink | ShardedLink = ShardedLink(b.shards, make_link) if b.shards else make_link(b.url)
        # several servers splitting device traffic: a dead peer's session is taken over (server/takeover.py)
        self.takeover = SessionTakeover(
            self.registry, owner=self.owner, client_id=client_id, ttl_s=config.rollout.lease_ttl_s, clock=clock,
            connect=lambda peer: [make_link(url, peer) for url in (b.shards or [b.url])],
            # anonymous broker: any client id; secured: only a login we hold (with our own we would take our session)
            may_take=lambda peer: not b.username or peer in peers,
        ) if b.shared_subscriptions else None
        self.chunks = ChunkServer(
            read_chunk=self.artifacts.chunk,
            chunk_count=lambda a: self.artifacts.info(a).chunk_count,
            authorize=self._authorize_chunks,
            publish=self.link.publish,
            broadcast=p.broadcast, window_s=p.chunk_window_s, late_threshold=p.late_broadcast_threshold,
            egress_bytes_s=p.broadcast_egress_mb_s * 1e6,
            on_reject=self._on_chunk_reject, on_sent=self.publish_stats.chunk_sent,
            resend_limit=lambda n: int(config.quotas.chunk_resend_factor * n) + config.quotas.chunk_resend_floor,
            on_throttled=self._on_chunk_throttled, pace=pace,
        )
        self.dispatcher = Dispatcher(self.registry, self.signer, self.artifacts, config)
        self.driver = RolloutDriver(self.registry, self.dispatcher, self.builds, config, owner=self.owner,
                                    expect_requests=self.chunks.expect, clock=clock)
        self.outbox = Outbox(self.registry, self.signer, config, owner=self.owner, clock=clock,
                             publish=lambda topic, blob, retain: self.link.publish(topic, blob, retain=retain),
                             on_published=self.publish_stats.published)
        self.service = FleetService(config, self.registry, builds=self.builds, artifacts=self.artifacts,
                                    profiles=profiles, signer=self.signer, kick=self.kick, clock=clock)
        self.api = Api(self.service, metrics=self.render_metrics, public_metrics=config.api.public_metrics)
        a = config.api
        tls = (config.resolve(a.tls_cert), config.resolve(a.tls_key)) if a.tls_cert else None
        self.http = ApiHttpServer((a.host, a.port), self.api, limits=a, tls=tls)
        self._last_housekeeping = 0.0
        self._last_retained_sweep = clock()  # the subscription on connect reads them the first time
        self._allowed: dict[tuple[str, str], float] = {}
        self._allowed_bulk: dict[str, float] = {}  # artifact id -> when devices_desiring_artifact last ran

    # -- wiring ---------------------------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    def _on_ingest_written(self, changed: bool) -> None:
        if changed:
            self._wake.set()

    def _on_chunk_request(self, req: ChunkRequest) -> None:
        self.chunks.submit(req)

    def _authorize_chunks(self, device_id: str, artifact_id: str) -> bool:
        """Only a device whose desired state (or a live probe) names this artifact gets its chunks (cached a minute)."""
        now = time.monotonic()
        if self._allowed.get((device_id, artifact_id), 0.0) > now:
            return True
        if now - self._allowed_bulk.get(artifact_id, -1e9) >= 1.0:
            # a rollout's devices ask within seconds of each other: one query authorises all of them (at most once
            # a second per artifact; a device not found there gets its own query below)
            self._allowed_bulk[artifact_id] = now
            for device in self.registry.devices_desiring_artifact(artifact_id):
                self._allowed[(device, artifact_id)] = now + 60.0
            if self._allowed.get((device_id, artifact_id), 0.0) > now:
                return True
        allowed = self.registry.desired_names_artifact(device_id, artifact_id) or \
            self.registry.probe_names_artifact(device_id, artifact_id)
        if allowed:
            self._allowed[(device_id, artifact_id)] = now + 60.0
        return allowed

    def _on_chunk_reject(self, req: ChunkRequest, reason: str) -> None:
        self.ingest.stats.reject("chunk_access")
        log.warning("chunk request from %s refused: %s", req.device_id, reason)

    def _on_chunk_throttled(self, req: ChunkRequest, reason: str) -> None:
        log.warning("chunk request from %s throttled: %s", req.device_id, reason)
        self.ingest.throttled(req.device_id, CHUNK_RESENDS, reason, self.clock())

    def _quota_housekeeping(self, now: float) -> None:
        """Clear retained messages devices left where only up/state may keep one; sweep for them now and then."""
        self.ingest.clear_stray_retained(lambda topic, blob, retain: self.link.publish(topic, blob, retain=retain),
                                         now)
        if now - self._last_retained_sweep >= self.config.quotas.retained_sweep_s:
            self._last_retained_sweep = now
            self.link.sweep_retained()

    def render_metrics(self) -> str:
        return render_metrics(self.registry, ingest=self.ingest.stats, publish=self.publish_stats,
                              quota=self.ingest.quota_stats,
                              extra=[*self.http.stats.families(), *self._pace_families()])

    def _pace_families(self) -> list[Family]:
        if self.chunks.pace is None:
            return []
        factor, lead, cuts = self.chunks.pace_state()
        return [
            Family("edgefleet_broadcast_pace", "gauge",
                   "Share of publisher.broadcast_egress_mb_s in use (it follows the subscribers)").add(factor),
            Family("edgefleet_broadcast_lead_chunks", "gauge",
                   "Chunks the broker holds for the slowest subscriber of the shared streams").add(lead),
            Family("edgefleet_broadcast_pace_cuts_total", "counter",
                   "Times the fan-out budget was halved because subscribers lagged").add(cuts),
        ]

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        host = self.config.api.host
        return f"{self.http.scheme}://{f'[{host}]' if ':' in host else host}:{self.http.port}"

    def start(self) -> FleetServer:
        self.ingest.start()
        self.chunks.start()
        self.link.start(wait_s=10.0)
        if self.takeover is not None:
            self.takeover.start()
        self.http.start()
        self._loop_thread = threading.Thread(target=self._loop, name="edgefleet-control", daemon=True)
        self._loop_thread.start()
        atomic_write(
            self.config.home / RUNTIME_FILE,
            json.dumps({"pid": os.getpid(), "api_url": self.api_url, "instance": self.instance,
                        "owner": self.owner, "started_at": self.clock()}).encode(),
            mode=0o600,
        )
        brokers = self.link.describe() if isinstance(self.link, ShardedLink) else f"{self.link.host}:{self.link.port}"
        log.info("edgefleet server %s: API on %s (web console %s/ui/), broker %s", self.owner, self.api_url,
                 self.api_url.rstrip("/"), brokers)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=15)
        self.dispatcher.deltas.close()
        self.http.stop()
        self.chunks.stop()
        self.link.flush(timeout_s=5.0)
        self.link.stop()
        if self.takeover is not None:
            self.takeover.stop()  # after our own link is gone: a peer may now drain our session
        self.ingest.stop()
        with contextlib.suppress(ServerError):
            self.driver.release_all()
            self.registry.release_lease("outbox", self.owner)
        with contextlib.suppress(OSError):
            info = json.loads((self.config.home / RUNTIME_FILE).read_text())
            if info.get("owner") == self.owner:
                (self.config.home / RUNTIME_FILE).unlink()
        self.artifacts.close()
        self.registry.db.close()  # PostgreSQL: every thread's connection and the LISTEN one
        log.info("edgefleet server %s stopped", self.owner)

    def _loop(self) -> None:
        tick = self.config.rollout.tick_s
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.control_step()
            except Exception:  # a bug or the registry is unavailable: keep the loop alive
                log.exception("control loop step failed")
            self._wake.wait(tick)

    def control_step(self) -> None:
        """One pass of the control loop (public so tests can drive it deterministically)."""
        now = self.clock()
        self.driver.tick()
        if self.link.connected.is_set():
            self._quota_housekeeping(now)
            if self.takeover is not None:
                self.takeover.step(now)
        if self.link.connected.is_set() and self.outbox.holds_lease(now):
            safe_flush(self.outbox, now)
            if now - self._last_housekeeping >= HOUSEKEEPING_EVERY_S:
                self._last_housekeeping = now
                self.outbox.housekeeping(now)
                safe_flush(self.outbox, now)
        self.http.flush_audit()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_signer(config: ServerConfig) -> Signer:
    return Signer(load_signing_key(config.paths))
