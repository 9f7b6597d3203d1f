"""Which of N independent brokers ("shards") a device uses: a stable hash of its id (docs/scale.md).

Rendezvous (highest-random-weight) hashing: for each shard index ``i`` in ``0..N-1`` the weight is the
first 8 bytes, big-endian, of ``SHA-256("edgefleet-shard:" + i + ":" + device_id)`` (UTF-8, ``i`` in
decimal), and the device belongs to the shard with the highest weight (ties, which need a SHA-256
collision of the first 64 bits, go to the lower index). The result depends only on the device id and
N: every server, the agent's ``init`` and the simulator compute the same shard with no lookup, and
going from N to N + 1 shards moves only about 1 / (N + 1) of the devices (those whose new weight wins),
never a device between two old shards. Pinned by tests/unit/protocol/test_shards.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from agent.protocol.topics import validate_device_id

__all__ = ["MAX_SHARDS", "pick", "shard_of"]

#: more independent brokers than any deployment of this design needs (the weights cost one SHA-256 each)
MAX_SHARDS = 256

T = TypeVar("T")


def _weight(index: int, device_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"edgefleet-shard:{index}:{device_id}".encode()).digest()[:8], "big")


def shard_of(device_id: str, shards: int) -> int:
    """The shard index (``0..shards-1``) of ``device_id``; raises ValueError for a bad id or count."""
    validate_device_id(device_id)
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shard count must be within 1..{MAX_SHARDS}, got {shards}")
    if shards == 1:
        return 0
    best, best_weight = 0, -1
    for i in range(shards):
        w = _weight(i, device_id)
        if w > best_weight:
            best, best_weight = i, w
    return best


def pick(device_id: str, items: Sequence[T]) -> T:
    """``items[shard_of(device_id, len(items))]``: a device's broker from the ordered list of shard brokers."""
    return items[shard_of(device_id, len(items))]
