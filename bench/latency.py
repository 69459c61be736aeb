"""Latency at a steady rate: commit time → Kafka ack time, per event.

A writer commits ``txn_size`` events every ``txn_size / rate`` seconds (on a fixed schedule,
not sleep-after-work, so it keeps the rate) and notes the wall-clock time each COMMIT returned.
The relay under test notes the time its delivery callback saw each ack (bench/acklog.py).
Latency = ack time - commit-return time, on the same clock. The commit-return time is at most
a local round trip after the commit itself, so this understates by well under a millisecond.
"""

from __future__ import annotations

import time

import psycopg

from bench.workload import AGGREGATE_TYPE, EVENT_TYPE, payload_sql


def write_steadily(
    url: str,
    table: str,
    *,
    rate: int,
    seconds: float,
    txn_size: int,
    aggregates: int,
    pad: int,
    first_seq: int,
) -> dict[int, float]:
    """Commit ``rate`` events/s for ``seconds``; returns seq → commit-return time."""
    interval = txn_size / rate
    committed: dict[int, float] = {}
    statement = (
        f"INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) "
        f"SELECT gen_random_uuid(), '{AGGREGATE_TYPE}', 'a-' || mod(n, {aggregates}), "
        f"'{EVENT_TYPE}', {payload_sql(pad)} FROM generate_series(%s::bigint, %s::bigint) AS n"
    )
    transactions = int(seconds / interval)
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.monotonic()
        for k in range(transactions):
            due = start + k * interval
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lo = first_seq + k * txn_size
            conn.execute(statement, (lo, lo + txn_size - 1), prepare=True)
            now = time.time()
            for seq in range(lo, lo + txn_size):
                committed[seq] = now
    return committed


def latencies(
    committed: dict[int, float], acked: dict[int, float], *, counted_from: int
) -> list[float]:
    """Seconds from commit to ack of every event from seq ``counted_from`` on; every written
    event must have been acknowledged."""
    missing = [seq for seq in committed if seq not in acked]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(committed)} events were never acknowledged")
    return [acked[seq] - at for seq, at in committed.items() if seq >= counted_from]
