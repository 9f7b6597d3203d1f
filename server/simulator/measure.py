"""Stand-in latency measurements for simulated devices: a per-profile latency model with per-device noise.

Not a measurement of anything: it lets ``edgefleet simulate`` exercise the measurement path (the wire
message, ingest, the per-profile aggregation, /metrics) at fleet scale. The model: the settings'
``latency_ms`` times a profile factor (slower boards take longer), times a variant factor (int8 helps on
CPUs with int8 dot products, fp16 only on GPUs), times a device's own factor (a stable draw from its id,
+-15 %), times run noise (+-5 %). p95 is 1.3x p50.
"""

from __future__ import annotations

import hashlib
import random

from agent.protocol.measurement import Measurement

#: relative speed of the profiles the simulator knows (1.0 = raspberry-pi-4); others count as 1.0
PROFILE_FACTOR = {
    "raspberry-pi-4": 1.0,
    "raspberry-pi-5": 0.45,
    "jetson-orin-nano": 0.25,
    "jetson-nano": 0.6,
    "coral-dev-board": 0.9,
    "x86-64-avx2": 0.2,
    "x86-64-avx512-vnni": 0.15,
}


def variant_factor(variant: str | None, profile: str) -> float:
    v = (variant or "fp32").lower()
    gpu = profile.startswith("jetson")
    if v.startswith("fp16") and not v.startswith("fp16-weights"):
        return 0.55 if gpu else 1.6
    if "int8" in v or "litert" in v:
        return 1.2 if gpu else 0.6
    return 1.0


def _device_factor(device_id: str) -> float:
    digest = hashlib.sha256(device_id.encode()).digest()
    return 0.85 + 0.30 * (int.from_bytes(digest[:4], "big") / 0xFFFFFFFF)


def stand_in(
    *, device_id: str, profile: str, model: str, version: int, variant: str | None, base_ms: float, ts: float,
    source: str = "warmup", artifact_id: str | None = None, probe_id: str | None = None,
    rng: random.Random | None = None,
) -> Measurement:
    draw = (rng or random.Random()).uniform(0.95, 1.05)  # noqa: S311 - noise, not security
    p50 = base_ms * PROFILE_FACTOR.get(profile, 1.0) * variant_factor(variant, profile) * _device_factor(device_id)
    p50 *= draw
    return Measurement(device_id=device_id, ts=ts, model=model, version=version, source=source, runs=20,
                       p50_ms=round(p50, 4), p95_ms=round(p50 * 1.3, 4), min_ms=round(p50 * 0.9, 4),
                       artifact_id=artifact_id, variant=variant, probe_id=probe_id,
                       execution_provider="simulated")
