"""The pure per-artifact chunk schedule (CONTRACTS.md section 3)."""

from __future__ import annotations

import threading
import time

from agent.protocol.messages import ChunkRequest
from server.chunks import ArtifactSchedule, ChunkServer, Send
from server.fanout import FanoutPace, PaceSettings


def drain(s: ArtifactSchedule, now: float, limit: int = 10_000) -> list[Send]:
    out: list[Send] = []
    while len(out) < limit:
        step = s.next_send(now)
        if step is None:
            return out
        out.append(step)
    raise AssertionError("schedule never ran dry")


def test_requests_inside_the_window_become_one_broadcast_round() -> None:
    s = ArtifactSchedule(10, window_s=0.5)
    s.request("a", [(0, 10)], now=0.0)
    assert s.next_send(0.1) is None  # still collecting
    assert s.deadline() == 0.5
    s.request("b", [(0, 10)], now=0.2)
    s.request("c", [(5, 8)], now=0.3)
    sends = drain(s, 0.6)
    assert sends == [Send(i, None) for i in range(10)]  # the union, once, in order
    assert s.idle


def test_round_starts_as_soon_as_every_expected_device_asked() -> None:
    s = ArtifactSchedule(4, window_s=10.0)
    s.expect(["a", "b"])
    s.request("a", [(0, 4)], now=0.0)
    assert s.next_send(0.0) is None
    s.request("b", [(0, 4)], now=0.1)
    assert s.next_send(0.1) == Send(0, None)


def test_request_for_chunks_ahead_of_the_stream_is_merged_and_passed_ones_go_unicast() -> None:
    s = ArtifactSchedule(10, window_s=0.0, late_threshold=3)
    s.request("a", [(0, 6)], now=0.0)
    first = [s.next_send(0.0) for _ in range(4)]
    assert first == [Send(i, None) for i in range(4)]
    s.request("late", [(0, 10)], now=0.1)  # 0-3 passed, 4-5 pending, 6-9 merged into the round
    rest = drain(s, 0.1)
    broadcast = [x.index for x in rest if x.device_id is None]
    unicast = [x.index for x in rest if x.device_id == "late"]
    assert broadcast == [4, 5, 6, 7, 8, 9]
    assert sorted(unicast) == [0, 1, 2, 3]
    assert s.idle


def test_many_late_devices_get_another_broadcast_round_instead_of_unicasts() -> None:
    s = ArtifactSchedule(6, window_s=0.0, late_threshold=2)
    s.request("a", [(0, 6)], now=0.0)
    for _ in range(3):
        s.next_send(0.0)
    s.request("x", [(0, 6)], now=0.1)
    s.request("y", [(0, 6)], now=0.1)
    rest = drain(s, 0.1)
    assert all(x.device_id is None for x in rest)
    assert [x.index for x in rest] == [3, 4, 5, 0, 1, 2]


def test_unicast_mode_serves_every_request_per_device_round_robin() -> None:
    s = ArtifactSchedule(4, broadcast=False)
    s.request("a", [(0, 2)], now=0.0)
    s.request("b", [(2, 4)], now=0.0)
    s.request("a", [(1, 2)], now=0.0)  # duplicate index: sent once
    sends = drain(s, 0.0)
    assert sends == [Send(0, "a"), Send(2, "b"), Send(1, "a"), Send(3, "b")]


def test_unicast_and_broadcast_interleave_so_late_devices_are_not_starved() -> None:
    s = ArtifactSchedule(100, window_s=0.0, late_threshold=5)
    s.request("a", [(0, 100)], now=0.0)
    for _ in range(50):
        s.next_send(0.0)
    s.request("late", [(0, 3)], now=0.0)
    # the late device's chunks are queued for after the round (below the threshold) ...
    nxt = [s.next_send(0.0) for _ in range(4)]
    assert all(x is not None and x.device_id is None for x in nxt)
    rest = drain(s, 0.0)
    assert [x.index for x in rest if x.device_id == "late"] == [0, 1, 2]


def test_out_of_range_indexes_are_clamped() -> None:
    s = ArtifactSchedule(3, window_s=0.0)
    assert s.request("a", [(2, 50)], now=0.0) == 1
    assert s.request("a", [(7, 9)], now=0.0) == 0
    assert drain(s, 0.0) == [Send(2, None)]


def _paced_run(egress_bytes_s: float, pace: FanoutPace | None = None) -> list[float]:
    sent: list[float] = []
    done = threading.Event()

    def publish(topic: str, data: bytes) -> None:
        sent.append(time.monotonic())
        if len(sent) == 5:
            done.set()

    server = ChunkServer(read_chunk=lambda a, i: b"x" * 10_000, chunk_count=lambda a: 5, authorize=lambda d, a: True,
                         publish=publish, broadcast=True, window_s=0.0, late_threshold=3,
                         egress_bytes_s=egress_bytes_s, pace=pace)
    art = "ab" * 16
    server.expect(art, [f"d{i}" for i in range(10)])
    server.start()
    try:
        server.submit(ChunkRequest(device_id="d0", artifact_id=art, ranges=((0, 5),), ts=0.0, reason="initial"))
        assert done.wait(10)
    finally:
        server.stop()
    return sent


def test_a_shared_stream_is_paced_by_its_fan_out() -> None:
    # 10 devices take each 10 kB chunk: 100 kB of broker egress per chunk; at 1 MB/s that is 0.1 s apart
    paced = _paced_run(1e6)
    assert paced[-1] - paced[0] >= 0.35
    unpaced = _paced_run(0.0)
    assert unpaced[-1] - unpaced[0] < 0.3


def test_subscribers_lagging_behind_slow_the_shared_stream() -> None:
    pace = FanoutPace(PaceSettings(max_lead_bytes=160_000, hold_s=0.0, stale_s=600.0))
    now = time.monotonic()
    for i, held in enumerate([0, 10, 20, 40]):  # the broker holds ever more chunks: cut twice, to a quarter
        for _ in range(20):
            pace.note_chunk(10_000)
        pace.sample("broker", now - 3 + i, held)
    assert pace.factor(now) == 0.25
    paced = _paced_run(1e6, pace)  # 0.1 s between chunks at the full budget, 0.4 s at a quarter
    assert paced[-1] - paced[0] >= 1.4


# -- asking again (quotas) ---------------------------------------------------------------------------------


def test_one_devices_resend_is_never_broadcast_to_everyone() -> None:
    from server.chunks import ResendLedger

    s = ArtifactSchedule(8, window_s=0.0, late_threshold=3)
    ledger = ResendLedger(8, limit=None)
    s.request("a", [(0, 8)], now=0.0, ledger=ledger)
    s.request("b", [(0, 8)], now=0.0, ledger=ledger)
    assert drain(s, 0.0) == [Send(i, None) for i in range(8)]
    for t in (1.0, 2.0, 3.0):  # a asks for the whole artifact again, and again
        s.request("a", [(0, 8)], now=t, ledger=ledger)
        again = drain(s, t)
        assert again == [Send(i, "a") for i in range(8)], again  # only on a's own topic
    # resends of several devices at once still make one shared round
    for d in ("a", "b", "c"):
        s.request(d, [(2, 4)], now=5.0, ledger=ledger)
    shared = drain(s, 5.0)
    assert [x for x in shared if x.device_id is None] == [Send(2, None), Send(3, None)], shared


def test_resends_over_the_budget_are_refused_and_the_budget_renews() -> None:
    from server.chunks import ChunkQuotaError, ResendLedger

    ledger = ResendLedger(10, limit=15, window_s=600.0)
    assert ledger.split("a", list(range(10)), 0.0) == (list(range(10)), [])
    assert ledger.split("a", list(range(10)), 1.0)[1] == list(range(10))
    try:
        ledger.split("a", list(range(10)), 2.0)
        raise AssertionError("a third full resend fit a budget of 15")
    except ChunkQuotaError as exc:
        assert "budget 15" in exc.message
    assert ledger.split("b", list(range(10)), 2.0)[0] == list(range(10))  # others are not affected
    assert ledger.split("a", list(range(5)), 601.0)[1] == list(range(5))  # a new window


def test_repeated_or_overlapping_ranges_count_once() -> None:
    s = ArtifactSchedule(8, window_s=0.0)
    assert s.request("a", [(0, 4)] * 1024, now=0.0) == 4
    assert s.request("b", [(6, 99), (2, 7), (-5, 1)], now=0.0) == 7  # 0, 2-7
    assert drain(s, 0.0) == [Send(i, None) for i in range(8)]
