"""Prometheus metrics: a custom collector that reads RelayStats at scrape time.

The hot loop only bumps plain integers (stats.py); nothing here runs per event. The collector is
registered in its own CollectorRegistry (not the process-global one), served by endpoint.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cdc_relay import __version__
from cdc_relay.adapters import native_acks
from cdc_relay.core import native
from cdc_relay.core.schedule import ScheduledStats
from cdc_relay.core.stats import RelayStats

WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
RECONNECT_CAUSES = ("database", "replication", "kafka", "slot_in_use")
DELIVERY_ERROR_KINDS = ("record", "pipeline", "refused")

# Every series name the relay exposes (histogram and counter suffixes included): dashboards and
# alert rules in deploy/ may use only these (tests/unit/test_deploy.py).
METRIC_NAMES = frozenset(
    {
        "cdc_relay_info",
        "cdc_relay_events_published_total",
        "cdc_relay_events_dead_lettered_total",
        "cdc_relay_delivery_errors_total",
        "cdc_relay_reconnects_total",
        "cdc_relay_sessions_total",
        "cdc_relay_producer_resets_total",
        "cdc_relay_in_flight_events",
        "cdc_relay_in_flight_bytes",
        "cdc_relay_confirmed_lsn_bytes",
        "cdc_relay_replication_lag_bytes",
        "cdc_relay_slot_wal_status",
        "cdc_relay_lag_sample_timestamp_seconds",
        "cdc_relay_lag_sample_errors_total",
        "cdc_relay_end_to_end_latency_seconds_bucket",
        "cdc_relay_end_to_end_latency_seconds_count",
        "cdc_relay_end_to_end_latency_seconds_sum",
        "cdc_relay_last_ack_timestamp_seconds",
        "cdc_relay_streaming",
        "cdc_relay_broker_reachable",
        "cdc_relay_delivery_stalled_seconds",
        "cdc_relay_scheduled_events",
        "cdc_relay_scheduled_due_events",
        "cdc_relay_scheduled_overdue_events",
        "cdc_relay_scheduled_oldest_due_age_seconds",
        "cdc_relay_scheduled_sample_timestamp_seconds",
        "cdc_relay_scheduled_moved_total",
        "cdc_relay_scheduled_errors_total",
    }
)


class RelayCollector(Collector):
    """Turns one RelayStats into metric families, each time Prometheus scrapes."""

    def __init__(
        self,
        stats: RelayStats,
        *,
        slot: str,
        publication: str,
        scheduled: ScheduledStats | None = None,
    ) -> None:
        self._stats = stats
        self._slot = slot
        self._publication = publication
        self._scheduled = scheduled

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        info = GaugeMetricFamily(
            "cdc_relay_info",
            "The relay's version, slot and publication, its core: mypyc (compiled) or "
            "pure-Python, and what counts Kafka's acknowledgements: C or callbacks.",
            labels=["version", "slot", "publication", "core", "acks"],
        )
        labels = [__version__, self._slot, self._publication, native.IMPLEMENTATION]
        info.add_metric([*labels, native_acks.label()], 1)
        yield info

        published = CounterMetricFamily(
            "cdc_relay_events_published_total",
            "Outbox events handed to the producer for their topic, by source: the outbox "
            "table, or message:<prefix> for logical decoding messages (replays after a reset "
            "count again).",
            labels=["topic", "table"],
        )
        for source, counts in sorted(dict(stats.published_by_source).items()):
            for topic, count in sorted(dict(counts).items()):
                published.add_metric([topic, source], count)
        yield published
        yield CounterMetricFamily(
            "cdc_relay_events_dead_lettered_total",
            "Outbox events sent to the dead-letter topic.",
            value=stats.dead_lettered,
        )
        yield _labelled_counter(
            "cdc_relay_delivery_errors_total",
            "Records Kafka or the producer refused: kind=record (refused for good, "
            "dead-lettered), pipeline (reset and replay), refused (by produce()).",
            "kind",
            DELIVERY_ERROR_KINDS,
            stats.delivery_errors,
        )
        yield _labelled_counter(
            "cdc_relay_reconnects_total",
            "Replication sessions that ended in a failure or found the slot held, by cause.",
            "cause",
            RECONNECT_CAUSES,
            stats.reconnects_by_cause,
        )
        yield CounterMetricFamily(
            "cdc_relay_sessions_total", "Replication sessions started.", value=stats.sessions
        )
        yield CounterMetricFamily(
            "cdc_relay_producer_resets_total",
            "Producers discarded after a delivery failure.",
            value=stats.resets,
        )
        yield GaugeMetricFamily(
            "cdc_relay_in_flight_events",
            "Events produced and not yet acknowledged.",
            value=stats.in_flight_events,
        )
        yield GaugeMetricFamily(
            "cdc_relay_in_flight_bytes",
            "Bytes of record values (payloads) produced and not yet acknowledged.",
            value=stats.in_flight_bytes,
        )
        yield GaugeMetricFamily(
            "cdc_relay_confirmed_lsn_bytes",
            "WAL position the relay last confirmed to the slot, as a byte offset.",
            value=stats.confirmed_lsn,
        )
        lag = GaugeMetricFamily(
            "cdc_relay_replication_lag_bytes",
            "Server WAL position minus the slot's confirmed_flush_lsn, sampled.",
        )
        if stats.slot_lag_bytes is not None:
            lag.add_metric([], stats.slot_lag_bytes)
        yield lag
        wal_status = GaugeMetricFamily(
            "cdc_relay_slot_wal_status",
            "1 for the slot's current wal_status (pg_replication_slots), sampled.",
            labels=["status"],
        )
        current = stats.slot_wal_status
        if current is not None:
            for status in sorted({*WAL_STATUSES, current}):
                wal_status.add_metric([status], 1 if status == current else 0)
        yield wal_status
        yield GaugeMetricFamily(
            "cdc_relay_lag_sample_timestamp_seconds",
            "Unix time of the last successful lag sample.",
            value=stats.slot_sampled_unix,
        )
        yield CounterMetricFamily(
            "cdc_relay_lag_sample_errors_total",
            "Lag samples that failed.",
            value=stats.lag_sample_errors,
        )
        histogram = stats.latency
        buckets = [(_le(bound), count) for bound, count in histogram.cumulative()]
        yield HistogramMetricFamily(
            "cdc_relay_end_to_end_latency_seconds",
            "Commit time in PostgreSQL to Kafka's acknowledgement of the transaction's last "
            "event, once per transaction with events.",
            buckets=buckets,
            sum_value=histogram.sum,
        )
        yield GaugeMetricFamily(
            "cdc_relay_last_ack_timestamp_seconds",
            "Unix time at which Kafka last acknowledged a transaction's last event.",
            value=stats.last_ack_unix,
        )
        yield GaugeMetricFamily(
            "cdc_relay_streaming",
            "1 while a replication session streams (0 while waiting, e.g. as a hot standby).",
            value=1 if stats.streaming else 0,
        )
        stalled = stats.stalled_since
        yield GaugeMetricFamily(
            "cdc_relay_delivery_stalled_seconds",
            "Seconds since Kafka last acknowledged anything while records are in flight (0 "
            "while acknowledgements flow or nothing is in flight).",
            value=max(0.0, time.monotonic() - stalled) if stalled is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "cdc_relay_broker_reachable",
            "1 while the producer reaches a Kafka broker.",
            value=1 if stats.broker_reachable else 0,
        )
        if self._scheduled is not None:
            yield from _scheduled_metrics(self._scheduled)


def _scheduled_metrics(stats: ScheduledStats) -> Iterator[Metric]:
    """Scheduled events (CDC_RELAY_SCHEDULED_TABLE): the table's counts as last sampled by the
    mover (every few seconds, while this relay holds the slot), and its counters."""
    yield GaugeMetricFamily(
        "cdc_relay_scheduled_events", "Scheduled events not yet moved.", value=stats.scheduled
    )
    yield GaugeMetricFamily(
        "cdc_relay_scheduled_due_events",
        "Scheduled events past their due time, not yet moved.",
        value=stats.due,
    )
    yield GaugeMetricFamily(
        "cdc_relay_scheduled_overdue_events",
        "Due scheduled events later than CDC_RELAY_SCHEDULED_OVERDUE_SECONDS.",
        value=stats.overdue,
    )
    yield GaugeMetricFamily(
        "cdc_relay_scheduled_oldest_due_age_seconds",
        "How far past its due time the oldest unmoved scheduled event is (0 when none is due).",
        value=stats.oldest_due_age_seconds,
    )
    yield GaugeMetricFamily(
        "cdc_relay_scheduled_sample_timestamp_seconds",
        "When the scheduled table was last sampled (0 before the first sample).",
        value=stats.sampled_unix,
    )
    yield CounterMetricFamily(
        "cdc_relay_scheduled_moved_total",
        "Scheduled events moved into the outbox.",
        value=stats.moved_total,
    )
    yield CounterMetricFamily(
        "cdc_relay_scheduled_errors_total",
        "Passes of the mover that failed (connection, statement).",
        value=stats.errors_total,
    )


def _labelled_counter(
    name: str, doc: str, label: str, known: tuple[str, ...], counts: dict[str, int]
) -> CounterMetricFamily:
    # Known label values are always present (at 0), so rate() and alerts see them from start.
    family = CounterMetricFamily(name, doc, labels=[label])
    for value in sorted({*known, *dict(counts)}):
        family.add_metric([value], counts.get(value, 0))
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def registry_for(
    stats: RelayStats,
    *,
    slot: str,
    publication: str,
    scheduled: ScheduledStats | None = None,
) -> CollectorRegistry:
    """A registry of its own holding only the relay's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        RelayCollector(stats, slot=slot, publication=publication, scheduled=scheduled)
    )
    return registry
