"""Latency at a steady rate: commit time → the record visible to a consumer.

A writer commits ``txn_size`` events every ``txn_size / rate`` seconds (on a fixed schedule,
not sleep-after-work, so it keeps the rate) and notes the wall-clock time each COMMIT returned.
A consumer, assigned to every partition of the topic from the start, notes when each record
arrives. Latency = arrival time - commit-return time, per event, on the same clock. That is
an upper bound of (Kafka ack time - commit time): it adds the consumer's fetch delay
(``fetch.wait.max.ms`` = 5) and the broker's fetch path. The first ``warmup`` seconds of
writes are not counted.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.workload import AGGREGATE_TYPE, EVENT_TYPE, payload_sql
from tests.kafka_helpers import create_topic

PARTITIONS = 4  # what Tansu gives an auto-created topic, and so the relay's topics


class Arrivals(threading.Thread):
    """Consumes one topic from the beginning and notes when each seq arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        create_topic(bootstrap, topic, partitions=PARTITIONS)
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "allow.auto.create.topics": False,
                "fetch.wait.max.ms": 5,
                "fetch.min.bytes": 1,
                "log_level": 3,
            }
        )
        self.consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]
        )
        self.arrived: dict[int, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        consumer, arrived = self.consumer, self.arrived
        while not self.stopping.is_set():
            for msg in consumer.consume(1000, 0.05):
                value = msg.value()
                if msg.error() is None and value is not None:
                    now = time.time()
                    arrived[json.loads(value)["seq"]] = now
        consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


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


def measure(
    url: str,
    bootstrap: str,
    topic: str,
    table: str,
    *,
    rate: int,
    seconds: float,
    warmup: float,
    txn_size: int,
    aggregates: int,
    pad: int,
    first_seq: int,
    ready: Any = None,
) -> list[float]:
    """Latencies in seconds of the events written after the warm-up."""
    arrivals = Arrivals(bootstrap, topic)
    arrivals.start()
    try:
        committed = write_steadily(
            url,
            table,
            rate=rate,
            seconds=warmup + seconds,
            txn_size=txn_size,
            aggregates=aggregates,
            pad=pad,
            first_seq=first_seq,
        )
        deadline = time.monotonic() + 60
        while len(arrivals.arrived) < len(committed) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        arrivals.stop()
    missing = len(committed) - len(set(committed) & set(arrivals.arrived))
    if missing:
        raise RuntimeError(f"{missing} of {len(committed)} events never reached the consumer")
    skip = first_seq + int(warmup * rate)
    return [arrivals.arrived[seq] - t for seq, t in committed.items() if seq >= skip]
