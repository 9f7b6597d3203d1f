"""The device -> broker shard function is part of the contract: pinned values, balance, minimal movement."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from agent.protocol.shards import MAX_SHARDS, pick, shard_of

#: computed once and pinned: a change here silently moves every deployed device to another broker
PINNED = {
    "dev-0000": [0, 0, 2, 2, 2],
    "dev-0001": [0, 1, 2, 3, 6],
    "sim-0042": [0, 0, 2, 2, 5],
    "a": [0, 0, 2, 2, 2],
    "cam.front_01-x": [0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("device_id", sorted(PINNED))
def test_pinned_values(device_id: str) -> None:
    assert [shard_of(device_id, n) for n in (1, 2, 3, 4, 8)] == PINNED[device_id]


def test_the_documented_formula() -> None:
    """An implementation in another language follows docs/scale.md; this is that text as code."""
    def reference(device_id: str, n: int) -> int:
        weights = [int.from_bytes(hashlib.sha256(f"edgefleet-shard:{i}:{device_id}".encode()).digest()[:8], "big")
                   for i in range(n)]
        return max(range(n), key=lambda i: (weights[i], -i))
    for i in range(500):
        d = f"node-{i}"
        for n in (2, 3, 7):
            assert shard_of(d, n) == reference(d, n)


def test_balanced_and_adding_a_shard_moves_only_its_share() -> None:
    ids = [f"dev-{i:05d}" for i in range(4000)]
    counts = Counter(shard_of(d, 4) for d in ids)
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= c <= 1200 for c in counts.values()), counts
    moved = [d for d in ids if shard_of(d, 4) != shard_of(d, 5)]
    assert 0.1 * len(ids) < len(moved) < 0.3 * len(ids)  # about 1/5
    assert all(shard_of(d, 5) == 4 for d in moved)  # only onto the new shard, never between old ones


def test_pick_and_bad_input() -> None:
    urls = ["mqtt://a:1", "mqtt://b:2", "mqtt://c:3"]
    assert pick("dev-0001", urls) == urls[shard_of("dev-0001", 3)]
    with pytest.raises(ValueError):
        shard_of("dev/0001", 2)  # not a device id
    with pytest.raises(ValueError):
        shard_of("dev-1", 0)
    with pytest.raises(ValueError):
        shard_of("dev-1", MAX_SHARDS + 1)
