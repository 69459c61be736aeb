"""The pure parts of the benchmark: statistics, the table, profile and ack-log parsing."""

from __future__ import annotations

import os

import pytest

from bench import acklog, latency
from bench.report import (
    Latency,
    Row,
    SlotCase,
    SlotRun,
    median,
    percentile,
    render_table,
    scale_out_table,
    top_self_time,
)
from bench.run import BEGIN_MARK, END_MARK, write_section


def test_median_odd_and_even() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    # 10 values: p99 is the largest, p50 the fifth.
    ten = [float(v) for v in range(10, 0, -1)]
    assert percentile(ten, 99) == 10.0
    assert percentile(ten, 50) == 5.0


def test_latency_in_milliseconds() -> None:
    lat = Latency.of([0.010, 0.020, 0.030, 0.500])
    assert (lat.count, lat.p50_ms, lat.max_ms) == (4, 20.0, 500.0)
    assert lat.cell() == "20.0 / 500.0 / 500.0"


def test_table_ratios_against_the_ceiling_and_the_polling_relay() -> None:
    a = Row("(a) ceiling, stream", rates=[100.0, 90.0, 80.0])
    c = Row("(c) cdc-relay", rates=[72.0], rss_mb=61.4, latency=Latency(10, 5.0, 9.0, 12.0))
    d = Row("(d) polling relay, batch 500", rates=[24.0])
    table = render_table([a, c, d], ceiling="(a)", polling="(d)").splitlines()
    assert table[0].startswith("| contender | events/s")
    assert len(table) == 5
    cells = [cell.strip() for cell in table[3].split("|")[1:-1]]
    # name, median, runs, /a, /d, latency, rss, note
    assert cells[:7] == ["(c) cdc-relay", "72", "72", "0.80", "3.00", "5.0 / 9.0 / 12.0", "61"]
    assert [cell.strip() for cell in table[2].split("|")[1:-1]][1:5] == [
        "90",
        "100, 90, 80",
        "1.00",
        "3.75",
    ]


def test_top_self_time_counts_leaf_frames() -> None:
    collapsed = [
        "main (a.py:1);loop (a.py:5);decode (p.py:9) 5",
        "main (a.py:1);loop (a.py:5);produce (q.py:3) 3",
        "main (a.py:1);decode (p.py:12) 2",
        "",
        "garbage",
    ]
    top = top_self_time(collapsed, limit=2)
    assert top == [("decode (p.py)", 70.0), ("produce (q.py)", 30.0)]
    assert top_self_time([]) == []


def test_ack_log_round_trip(tmp_path) -> None:
    log = acklog.AckLog(tmp_path / "acks.txt")
    log.entries += [
        (b'{"pad": "xx", "seq": 12}', 100.25),
        (None, 101.0),  # a tombstone has no seq: skipped
        (b'{"pad": "xx", "seq": 12}', 105.0),  # a replayed duplicate: the first ack counts
        (b'{"pad": "", "seq": 13}', 100.5),
    ]
    log.write()
    assert acklog.read(log.path) == {12: 100.25, 13: 100.5}


def test_latencies_skip_the_warm_up_and_require_every_ack() -> None:
    committed = {1: 10.0, 2: 10.0, 3: 11.0}
    acked = {1: 10.5, 2: 10.01, 3: 11.02}
    assert latency.latencies(committed, acked, counted_from=2) == pytest.approx([0.01, 0.02])
    with pytest.raises(RuntimeError, match="1 of 3"):
        latency.latencies(committed, {1: 10.5, 2: 10.01}, counted_from=0)


def test_write_section_keeps_the_text_around_the_markers(tmp_path) -> None:
    path = tmp_path / "performance.md"
    write_section(path, "first")
    assert path.read_text() == f"# Performance\n\n{BEGIN_MARK}\nfirst\n{END_MARK}\n"
    path.write_text(path.read_text().replace("# Performance", "# Perf\n\nanalysis") + "\nafter\n")
    write_section(path, "second")
    text = path.read_text()
    assert "analysis" in text and text.endswith(f"{END_MARK}\n\nafter\n")
    assert "second" in text and "first" not in text


def test_the_hot_path_harness_publishes_every_event():
    from bench.hotpath import make_frames, run_once

    seconds, published = run_once(make_frames(20))
    assert published == 200 and seconds > 0


def test_the_scale_out_table_is_per_slot_and_in_total_against_one_slot() -> None:
    one = SlotCase(1, "the whole outbox", [SlotRun((2.0,), (1000,), 2.0, relay_cpu=(8.0,))])
    two = SlotCase(
        2,
        "1/2 of it",
        [SlotRun((1.0, 1.4), (500, 500), 2.0), SlotRun((1.2, 1.4), (500, 500), 4.0)],
    )
    none = SlotCase(1, "none of it", [SlotRun((0.5,), (0,), 1.0)])
    table = scale_out_table([one, two, none], events=1000, wal_bytes=2_000_000).splitlines()
    assert len(table) == 5

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.split("|")[1:-1]]

    # 2 s for 1,000 events of 2 MB: 2,000 µs/event, 1,000,000 µs/MB.
    assert cells(table[2]) == [
        "1", "the whole outbox", "2000.00", "1,000,000", "2000.00", "1,000,000", "2000.00",
        "1.00", "8000.00", "2.0", "500",
    ]  # fmt: skip
    # Medians over runs: per slot (1.2 + 1.3) / 2, total (2.4 + 2.6) / 2; 1,000 events sent.
    assert cells(table[3])[2:] == [
        "1250.00", "625,000", "2500.00", "1,250,000", "2500.00", "1.25", "-", "3.0", "333",
    ]  # fmt: skip
    assert cells(table[4])[6] == "-"


def test_a_relay_preload_goes_to_the_relays_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import contenders

    def env() -> dict[str, str]:
        return contenders.relay_env_for(
            "postgresql://x", "k:9092", slot="s", topic_prefix="p", kafka_config=""
        )

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "LD_PRELOAD" not in env()
    monkeypatch.setattr(contenders, "relay_preload", "libmimalloc.so.2")
    assert env()["LD_PRELOAD"] == "libmimalloc.so.2"
    assert "LD_PRELOAD" not in os.environ  # the bench itself runs without it
