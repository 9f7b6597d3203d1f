"""The broadcast fan-out pace that follows the subscribers (server/fanout.py): pure, fed samples by hand."""

from __future__ import annotations

from server.fanout import (
    LAST_COUNTER_TOPIC,
    RETAINED_TOPIC,
    STORED_BYTES_TOPIC,
    STORED_TOPIC,
    UPTIME_TOPIC,
    FanoutPace,
    PaceSettings,
    parse_counter,
)

CHUNK = 64 * 1024
#: 1 MiB of 64 KiB chunks: a lead over 16 chunks is lagging, under 8 is keeping up
SETTINGS = PaceSettings(max_lead_bytes=16 * CHUNK, floor=1 / 16, increase=0.1, hold_s=2.0, baseline_s=60.0,
                        stale_s=5.0)


def paced() -> FanoutPace:
    pace = FanoutPace(SETTINGS)
    pace.note_chunk(CHUNK)
    return pace


def feed(pace: FanoutPace, held: list[int], start: float = 0.0, sent: int = 20) -> float:
    """One sample a second (mosquitto's sys_interval 1), ``sent`` chunks streamed before each; returns the
    time of the last one."""
    t = start
    for i, h in enumerate(held):
        t = start + i
        for _ in range(sent):
            pace.note_chunk(pace.chunk_bytes)
        pace.sample("broker", t, h)
    return t


def test_subscribers_that_keep_up_leave_the_budget_alone() -> None:
    pace = paced()
    # retained leftovers and a few chunks in flight: the lead over the minimum stays small
    t = feed(pace, [2000, 2003, 2005, 2004, 2006, 2003, 2005, 2002] * 4)
    assert pace.factor(t) == 1.0
    assert pace.decreases == 0


def test_a_growing_lead_halves_the_budget_once_per_hold_and_not_below_the_floor() -> None:
    pace = paced()
    t = feed(pace, [0, 5, 10, 16])  # at the limit: nothing yet
    assert pace.factor(t) == 1.0
    t = feed(pace, [18], start=t + 1)  # over it: halve
    assert pace.factor(t) == 0.5
    t = feed(pace, [22], start=t + 1)  # within hold_s of the last cut: wait to see its effect
    assert pace.factor(t) == 0.5
    t = feed(pace, [25, 30, 35, 40, 45, 50, 55, 60, 65, 70], start=t + 1)
    assert pace.factor(t) == SETTINGS.floor
    assert pace.decreases == 4


def test_a_shrinking_lead_is_not_cut_again_and_a_small_one_raises_the_budget() -> None:
    pace = paced()
    t = feed(pace, [0, 20, 24])
    assert pace.factor(t) == 0.5
    t = feed(pace, [23, 21, 19, 17], start=t + 1)  # still over, but the cut works: hold
    assert pace.factor(t) == 0.5
    t = feed(pace, [12], start=t + 1)  # between half and the limit: hold
    assert pace.factor(t) == 0.5
    t = feed(pace, [6, 3, 2, 1, 1], start=t + 1)  # caught up: +0.1 a sample, up to 1
    assert abs(pace.factor(t) - 1.0) < 1e-9
    t = feed(pace, [1] * 5, start=t + 1)
    assert pace.factor(t) == 1.0


def test_without_samples_the_fixed_budget_applies() -> None:
    pace = paced()
    assert pace.factor(0.0) == 1.0  # never a sample: another broker, or $SYS not readable
    t = feed(pace, [0, 20, 24])
    assert pace.factor(t) == 0.5
    assert pace.factor(t + SETTINGS.stale_s + 0.1) == 1.0


def test_a_burst_of_device_messages_is_not_a_lead() -> None:
    pace = paced()
    # a thousand chunk requests held on their way to the server as the stream starts (2 chunks a second)
    t = feed(pace, [0, 1322, 1300, 900, 3, 4], sent=2)
    assert pace.decreases == 0
    assert pace.factor(t) == 1.0
    # a real lead grows with the chunks streamed: 5 a second, behind by all of them
    t = feed(pace, [9, 14, 19, 24, 29], start=t + 1, sent=5)
    assert pace.factor(t) == 0.25  # over 16 at 19 and 29 (hold_s between)


def test_many_small_messages_or_new_retained_bytes_alone_are_not_a_lead() -> None:
    pace = paced()
    kb = 1000
    # (held messages, stored bytes): a thousand 300-byte events held; then a thousand 1.8 KB retained desired
    # states (not in the held count); then a real lead: 20 more chunks, both counts grow
    samples = [(5, 900 * kb), (1005, 1200 * kb), (5, 2700 * kb), (25, 2700 * kb + 20 * CHUNK)]
    for i, (held, stored) in enumerate(samples):
        for _ in range(10):
            pace.note_chunk(CHUNK)
        pace.sample("b", float(i * 3), held, stored)
        if i < 3:
            assert pace.lead <= 4, i  # 300 kB of events: 4 chunks' worth at most
    assert pace.lead == 20
    assert pace.factor(9.0) == 0.5


def test_chunks_pinned_longer_than_the_baseline_window_become_the_baseline() -> None:
    pace = paced()
    # an offline persistent session holds 40 chunks of an earlier stream: after baseline_s (60 s here) it is the minimum
    t = feed(pace, [0] + [40] * 70)
    assert pace.lead == 0
    assert pace.factor(t) == 1.0


def test_the_lead_is_counted_in_chunks_of_the_stream() -> None:
    pace = FanoutPace(SETTINGS)
    pace.note_chunk(256 * 1024)  # 1 MiB is 4 chunks of 256 KiB
    t = feed(pace, [0, 5, 6])
    assert pace.factor(t) == 0.5


def test_several_brokers_the_largest_lead_counts() -> None:
    pace = paced()
    for i, (a, b) in enumerate([(0, 0), (1, 20), (2, 24)]):
        for _ in range(20):
            pace.note_chunk(CHUNK)
        pace.sample("a", float(i), a)
        pace.sample("b", float(i), b)
    assert pace.factor(2.0) == 0.5


def test_sys_messages_sample_once_a_pass_at_its_end_and_ignore_garbage() -> None:
    pace = paced()

    def broker_pass(t: float, end: bool = True, **counters: bytes) -> None:  # mosquitto's order; unchanged left out
        pace.observe("b", UPTIME_TOPIC, f"{int(t)} seconds".encode(), t)
        for topic, key in ((STORED_TOPIC, "stored"), (STORED_BYTES_TOPIC, "stored_bytes"),
                           (RETAINED_TOPIC, "retained")):
            if key in counters:
                pace.observe("b", topic, counters[key], t)
        if end:
            pace.observe("b", LAST_COUNTER_TOPIC, str(int(t) * 100).encode(), t)

    broker_pass(0.0, stored=b"3002", stored_bytes=str(100 * CHUNK).encode())
    assert pace.samples == 0  # nothing until the retained count is known too
    broker_pass(2.0, retained=b"3000")
    assert (pace.samples, pace.lead) == (1, 0)  # the first sample: held 2
    for _ in range(40):
        pace.note_chunk(CHUNK)
    broker_pass(4.0, stored=b"3030", stored_bytes=str(128 * CHUNK).encode())
    assert (pace.samples, pace.lead) == (2, 28)  # this pass's counters, at its end
    broker_pass(6.0)  # nothing changed: the same lead
    assert (pace.samples, pace.lead) == (3, 28)
    broker_pass(8.0, stored=b"3002", end=False)  # the end not seen: sampled at the next pass's uptime
    assert pace.samples == 3
    pace.observe("b", UPTIME_TOPIC, b"10 seconds", 10.0)
    assert (pace.samples, pace.lead) == (4, 0)
    pace.observe("b", STORED_TOPIC, b"-1", 10.0)
    pace.observe("b", STORED_TOPIC, b"9" * 30, 10.0)
    pace.observe("b", "$SYS/broker/clients/connected", b"5", 10.0)
    pace.observe("b", LAST_COUNTER_TOPIC, b"1000", 10.0)
    assert (pace.samples, pace.lead) == (5, 0)
    assert parse_counter(b"12") == 12
    assert parse_counter(b"") is None
    assert parse_counter(b"1.5") is None


def test_only_shared_streams_with_a_budget_and_a_limit_are_paced() -> None:
    pace = FanoutPace.for_settings(True, 250.0, 512)
    assert pace is not None
    assert pace.settings.max_lead_bytes == 512 * 1024
    assert FanoutPace.for_settings(True, 0.0, 1024) is None  # unpaced: nothing to scale
    assert FanoutPace.for_settings(True, 250.0, 0) is None  # the fixed budget
    assert FanoutPace.for_settings(False, 250.0, 1024) is None  # unicast
