"""Counters and gauges of a relay's life: plain numbers that the hot loop updates cheaply and
that the metrics collector (metrics.py) reads at scrape time, from another thread.

Nothing here takes a lock: every field is written by one thread (the relay loop, or the lag
sampler for the ``slot_*`` fields) and a reader tolerates a value that is one update old.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Protocol

from cdc_relay.core.copydata import unix_seconds

# End-to-end latency buckets (seconds), from a commit in PostgreSQL to Kafka's last ack of it.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class InFlight(Protocol):
    """What the collector reads of the current session's AckTracker."""

    in_flight_events: int
    in_flight_bytes: int


class Histogram:
    """A cumulative-at-read histogram: ``observe`` costs one bisect and two additions."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ it) per bucket, ending with (inf, count)."""
        total, out = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(slots=True)
class RelayStats:
    # Records handed to the producer for their own topic. Records replayed after a reset count
    # again; a record Kafka then refuses for good counts in dead_lettered as well (a counter
    # never goes down).
    published: int = 0
    # The same per source (table, or message:<prefix>) and topic: the metric's labels.
    published_by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_lettered: int = 0
    # Delivery reports with an error, by how the relay judged them (record, pipeline), plus
    # records produce() refused outright ("refused").
    delivery_errors: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    resets: int = 0
    confirmed_lsn: int = 0
    # The end LSN of the last transaction whose records were handed to the producer (0: none
    # yet in this session): after a failover, what was produced past the new timeline's branch
    # point was never on the new primary (runtime/resume.py).
    produced_through: int = 0
    reconnects_by_cause: dict[str, int] = field(default_factory=dict)
    # Commit (Begin's commit time) → Kafka's ack of the transaction's last record, observed
    # once per transaction that carried outbox events.
    latency: Histogram = field(default_factory=Histogram)
    last_ack_unix: float = 0.0
    # Liveness and readiness (endpoint.py): a monotonic heartbeat of the loop, whether a
    # replication session streams, whether the producer reaches a broker.
    heartbeat: float = field(default_factory=time.monotonic)
    streaming: bool = False
    broker_reachable: bool = False
    tracker: InFlight | None = None
    # Monotonic time since when Kafka has acknowledged nothing with records in flight (None
    # while acknowledgements flow): the pipeline's liveness check of the Kafka side.
    stalled_since: float | None = None
    # Written by the lag sampler thread.
    slot_lag_bytes: int | None = None
    slot_wal_status: str | None = None
    slot_sampled_unix: float = 0.0
    lag_sample_errors: int = 0

    @property
    def published_by_topic(self) -> dict[str, int]:
        """Published records per topic, over every source."""
        out: dict[str, int] = {}
        for counts in list(self.published_by_source.values()):
            for topic, count in list(counts.items()):
                out[topic] = out.get(topic, 0) + count
        return out

    def count_reconnect(self, cause: str) -> None:
        self.reconnects_by_cause[cause] = self.reconnects_by_cause.get(cause, 0) + 1

    def transaction_read(self, end_lsn: int, records_at_begin: int) -> None:
        """A Commit was read; ``records_at_begin``: published + dead_lettered at its Begin."""
        if self.published + self.dead_lettered != records_at_begin:
            self.produced_through = end_lsn

    def count_delivery_error(self, kind: str) -> None:
        self.delivery_errors[kind] = self.delivery_errors.get(kind, 0) + 1

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def transaction_acknowledged(self, commit_time_us: int, now: float) -> None:
        """The last record of a transaction (committed at ``commit_time_us``, µs since
        2000-01-01) was acknowledged at Unix time ``now``: one latency observation."""
        self.last_ack_unix = now
        self.latency.observe(max(0.0, now - unix_seconds(commit_time_us)))

    @property
    def in_flight_events(self) -> int:
        tracker = self.tracker
        return tracker.in_flight_events if tracker is not None else 0

    @property
    def in_flight_bytes(self) -> int:
        tracker = self.tracker
        return tracker.in_flight_bytes if tracker is not None else 0
