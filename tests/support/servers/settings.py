"""The settings every test server starts from: fast publisher and rollout ticks, an ephemeral API port."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def server_settings(
    broker_url: str,
    client_id: str,
    *,
    device_timeout_s: float,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Config sections for a test server on ``broker_url``; ``overrides`` are merged into their sections."""
    data: dict[str, dict[str, Any]] = {
        "broker": {"url": broker_url, "client_id": client_id},
        "api": {"host": "127.0.0.1", "port": 0},
        "publisher": {"chunk_window_s": 0.2},
        "rollout": {"tick_s": 0.1, "lease_ttl_s": 2.0, "device_timeout_s": device_timeout_s},
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return data
