"""End to end against real PostgreSQL and a broker: what arrives in Kafka, what the slot says."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import pytest

from tests.integration.conftest import Outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    current_lsn,
    execute,
    insert_events,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_helpers import ConsumedRecord, consume_all
from tests.servers import wait_until


def seqs_by_key(records: list[ConsumedRecord]) -> dict[bytes, list[int]]:
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for r in records:
        assert r.key is not None and r.value is not None
        by_key[r.key].append(json.loads(r.value)["seq"])
    return by_key


@pytest.mark.compat
def test_events_arrive_byte_exact_with_topic_key_headers_and_timestamp(outbox: Outbox, kafka: str):
    # Payloads whose text form must survive untouched: jsonb normalises on input, and the
    # relay must send exactly what PostgreSQL outputs, not a re-encoding.
    rows = [
        ("order", "o-1", "OrderPlaced", '{"b": 2, "a": [1, 2.50, "é"], "z": null}', None),
        (
            "order",
            "o-1",
            "OrderPaid",
            '{"emoji": "🎉", "big": 12345678901234567890}',
            '{"trace": "t-1", "n": 7, "nested": {"x": true}}',
        ),
        ("customer", "客户-9", "Renamed", '"just a string"', "{}"),
        ("order", "o-2", "OrderPlaced", "[]", None),
    ]
    with_ids = []
    for aggregate_type, aggregate_id, event_type, payload, headers in rows:
        event_id = uuid.uuid4()
        with_ids.append(event_id)
        execute(
            outbox.url,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (event_id, aggregate_type, aggregate_id, event_type, payload, headers),
        )
    expected = {
        row[0]: row[1:]
        for row in query(
            outbox.url,
            "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, "
            "headers, floor(extract(epoch FROM created_at) * 1000)::bigint FROM outbox",
        )
    }
    end = current_lsn(outbox.url)
    with RelayProcess(outbox.env) as relay:
        records = consume_all(
            kafka,
            [outbox.topic("order"), outbox.topic("customer")],
            expected=4,
            timeout=60,
            linger=0.5,
        )
        wait_confirmed_past(outbox.url, end)
        assert relay.stop() == 0

    assert len(records) == 4
    for r in records:
        event_id = r.header("id").decode()
        aggregate_type, aggregate_id, event_type, payload, headers, created_ms = expected[event_id]
        assert r.topic == outbox.topic(aggregate_type)
        assert r.key == aggregate_id.encode()
        assert r.value == payload.encode()  # byte-exact, as PostgreSQL prints it
        assert r.header("event_type") == event_type.encode()
        assert r.header("aggregate_type") == aggregate_type.encode()
        assert r.timestamp_ms == created_ms
        extra = {k: v for k, v in r.headers if k not in ("id", "event_type", "aggregate_type")}
        if headers:
            assert extra == {
                k: (
                    v.encode()
                    if isinstance(v, str)
                    else json.dumps(v, separators=(",", ":")).encode()
                )
                for k, v in headers.items()
            }
        else:
            assert extra == {}
    paid = next(r for r in records if r.header("event_type") == b"OrderPaid")
    assert dict(paid.headers)["trace"] == b"t-1"
    assert dict(paid.headers)["nested"] == b'{"x":true}'


def test_many_transactions_arrive_in_commit_order_per_key(outbox: Outbox, kafka: str):
    total = 5_000
    with RelayProcess(outbox.env) as relay:
        # Concurrent with the relay: it streams while transactions commit.
        end = insert_events(outbox.url, count=total, per_txn=25, aggregates=200)
        records = consume_all(kafka, [outbox.topic()], expected=total, timeout=120, linger=1)
        wait_confirmed_past(outbox.url, end)
        assert relay.stop() == 0
    assert len(records) == total
    ids = [r.header("id") for r in records]
    assert len(set(ids)) == total  # a clean run sends each event once
    for key, seqs in seqs_by_key(records).items():
        assert seqs == sorted(seqs), f"key {key!r} out of commit order"


def test_updates_deletes_and_truncates_of_the_outbox_emit_nothing(outbox: Outbox, kafka: str):
    insert_events(outbox.url, count=3, per_txn=3)
    execute(outbox.url, "UPDATE outbox SET event_type = 'Changed'")
    execute(outbox.url, "DELETE FROM outbox WHERE payload->>'seq' = '0'")
    execute(outbox.url, "TRUNCATE outbox")
    end = insert_events(outbox.url, count=2, per_txn=2, start=100)
    with RelayProcess(outbox.env) as relay:
        wait_confirmed_past(outbox.url, end)
        records = consume_all(kafka, [outbox.topic()], expected=5, timeout=30, linger=1.5)
        assert relay.stop() == 0
    assert sorted(json.loads(r.value or b"")["seq"] for r in records) == [0, 1, 2, 100, 101]
    assert {r.header("event_type") for r in records} == {b"Tested"}


@pytest.mark.compat
def test_idle_advance_moves_the_slot_while_the_outbox_is_quiet(outbox: Outbox):
    execute(outbox.url, "CREATE TABLE busy (n int, pad text)")
    with RelayProcess(outbox.env) as relay:
        wait_until(lambda: slot_active(outbox.url), 30)
        start = confirmed_lsn(outbox.url)
        for _ in range(5):
            execute(
                outbox.url,
                "INSERT INTO busy SELECT n, repeat('y', 500) FROM generate_series(1, 2000) n",
            )
        target = current_lsn(outbox.url)
        assert target - start > 1_000_000
        wait_confirmed_past(outbox.url, target, timeout=60)
        assert relay.stop() == 0


@pytest.mark.compat
def test_kill_9_mid_stream_then_restart_loses_nothing(outbox: Outbox, kafka: str):
    # Enough that the backlog outlasts the relay's first confirmation: with inserts produced
    # in C, 40,000 events were drained and confirmed by then (CI caught it).
    total = 160_000
    end = insert_events(outbox.url, count=total, per_txn=50, aggregates=500)
    with RelayProcess(outbox.env) as first:
        # Kill it at its first confirmation (0.2 s status interval): part of the backlog is
        # confirmed, more is in flight, most is still unread.
        start = confirmed_lsn(outbox.url)
        wait_until(lambda: confirmed_lsn(outbox.url) > start, 120, interval=0.01)
        first.kill()
    assert confirmed_lsn(outbox.url) < end
    with RelayProcess(outbox.env) as second:
        wait_confirmed_past(outbox.url, end, timeout=120)
        assert second.stop() == 0
    # Duplicates are expected: read until the topic goes quiet, not up to a count.
    records = consume_all(kafka, [outbox.topic()], timeout=120, idle=3)
    ids = [r.header("id") for r in records]
    unique = set(ids)
    assert len(unique) == total, f"lost {total - len(unique)} events"
    duplicates = len(ids) - len(unique)
    print(f"kill -9 mid-stream: {total} events, {duplicates} duplicates")
    # Duplicates are what was in flight (at most CDC_RELAY_MAX_IN_FLIGHT_EVENTS) or acked since
    # the last status update (0.2 s here): far below the backlog.
    assert duplicates <= total // 2
    first_seen: dict[bytes, list[int]] = defaultdict(list)
    seen: set[bytes | None] = set()
    for r in records:
        if r.header("id") in seen:
            continue
        seen.add(r.header("id"))
        assert r.key is not None
        first_seen[r.key].append(json.loads(r.value or b"")["seq"])
    for key, seqs in first_seen.items():
        assert seqs == sorted(seqs), f"key {key!r} out of commit order after dedup"


def test_single_200k_row_transaction_with_bounded_memory(outbox: Outbox, kafka: str):
    rows = 200_000
    end = insert_events(outbox.url, count=rows, per_txn=rows, aggregates=1000)
    peak = 0.0
    with RelayProcess(outbox.env, "--debug") as relay:

        def done() -> bool:
            nonlocal peak
            peak = max(peak, relay.peak_rss_mb())
            return confirmed_lsn(outbox.url) >= end

        wait_until(done, 240, interval=0.2, message="the 200k-row transaction was not confirmed")
        peak = max(peak, relay.peak_rss_mb())
        assert relay.stop() == 0
    print(f"200,000-row transaction: peak RSS {peak:.1f} MB")
    assert peak < 150, f"peak RSS {peak:.1f} MB"
    records = consume_all(kafka, [outbox.topic()], expected=rows, timeout=180, idle=5)
    assert len({r.header("id") for r in records}) == rows


@pytest.mark.compat
def test_status_json_reports_the_slot(outbox: Outbox):
    end = insert_events(outbox.url, count=10)
    done = cli(outbox.env, "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    slot = report["slot"]
    assert slot["active"] is False
    assert slot["wal_status"] in ("reserved", "extended")
    assert slot["lag_bytes"] > 0
    assert "/" in slot["confirmed_flush_lsn"]
    assert report["publication"]["tables"] == ["public.outbox"]
    with RelayProcess(outbox.env) as relay:
        wait_confirmed_past(outbox.url, end)
        wait_until(
            lambda: json.loads(cli(outbox.env, "status", "--json").stdout)["slot"]["active"], 30
        )
        assert relay.stop() == 0
    text = cli(outbox.env, "status")
    assert "confirmed" in text.stdout and "public.outbox" in text.stdout


def test_shutdown_on_sigterm_confirms_what_was_acked(outbox: Outbox, kafka: str):
    end = insert_events(outbox.url, count=3_000, per_txn=100)
    with RelayProcess(outbox.env) as relay:
        consume_all(kafka, [outbox.topic()], expected=1, timeout=60)
        started = time.monotonic()
        assert relay.stop() == 0
        assert time.monotonic() - started < 30
    # Either everything was acked before the signal, or the rest follows on the next run.
    with RelayProcess(outbox.env) as relay:
        wait_until(lambda: slot_active(outbox.url), 30)
        wait_confirmed_past(outbox.url, end)
        assert relay.stop() == 0
    records = consume_all(kafka, [outbox.topic()], timeout=60, idle=3)
    assert len({r.header("id") for r in records}) == 3_000
