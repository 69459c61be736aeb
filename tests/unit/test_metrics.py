"""RelayStats → Prometheus exposition text, read at scrape time; the latency histogram; the
session's per-transaction latency observation; /healthz and /readyz."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cdc_relay.adapters import native_acks
from cdc_relay.adapters.http import HEARTBEAT_STALE_SECONDS, MetricsServer, health, readiness
from cdc_relay.adapters.metrics import METRIC_NAMES, registry_for
from cdc_relay.core import native
from cdc_relay.core.copydata import pg_time_us
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import OutboxRecord
from cdc_relay.core.pipeline import Pipeline, PipelineConfig
from cdc_relay.core.schedule import ScheduledStats
from cdc_relay.core.stats import Histogram, RelayStats
from cdc_relay.errors import RelayError
from tests import frames


def samples(
    stats: RelayStats, scheduled: ScheduledStats | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = registry_for(stats, slot="s1", publication="p1", scheduled=scheduled)
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Tracker:
    in_flight_events = 7
    in_flight_bytes = 900


def test_stats_become_metrics_at_scrape_time():
    stats = RelayStats()
    stats.published_by_source["public.outbox"] = {"outbox.event.order": 5, "outbox.event.user": 2}
    stats.published_by_source["message:cdc_relay.outbox"] = {"outbox.event.order": 3}
    stats.dead_lettered = 1
    stats.count_delivery_error("record")
    stats.count_reconnect("kafka")
    stats.count_reconnect("kafka")
    stats.confirmed_lsn = 0x1_0000_0010
    stats.tracker = Tracker()
    stats.slot_lag_bytes = 4096
    stats.slot_wal_status = "extended"
    stats.streaming = True
    m = samples(stats)
    table = ("table", "public.outbox")
    assert m[("cdc_relay_events_published_total", (table, ("topic", "outbox.event.order")))] == 5
    assert m[("cdc_relay_events_published_total", (table, ("topic", "outbox.event.user")))] == 2
    # Events written as logical decoding messages carry their source too.
    messages = ("table", "message:cdc_relay.outbox")
    assert m[("cdc_relay_events_published_total", (messages, ("topic", "outbox.event.order")))] == 3
    assert stats.published_by_topic == {"outbox.event.order": 8, "outbox.event.user": 2}
    assert m[("cdc_relay_events_dead_lettered_total", ())] == 1
    assert m[("cdc_relay_delivery_errors_total", (("kind", "record"),))] == 1
    assert m[("cdc_relay_delivery_errors_total", (("kind", "pipeline"),))] == 0
    assert m[("cdc_relay_reconnects_total", (("cause", "kafka"),))] == 2
    assert m[("cdc_relay_reconnects_total", (("cause", "slot_in_use"),))] == 0
    assert m[("cdc_relay_confirmed_lsn_bytes", ())] == 0x1_0000_0010
    assert m[("cdc_relay_in_flight_events", ())] == 7
    assert m[("cdc_relay_in_flight_bytes", ())] == 900
    assert m[("cdc_relay_replication_lag_bytes", ())] == 4096
    assert m[("cdc_relay_slot_wal_status", (("status", "extended"),))] == 1
    assert m[("cdc_relay_slot_wal_status", (("status", "reserved"),))] == 0
    assert m[("cdc_relay_streaming", ())] == 1
    info = (
        ("acks", native_acks.label()),
        ("core", native.IMPLEMENTATION),
        ("publication", "p1"),
        ("slot", "s1"),
    )
    assert m[("cdc_relay_info", (*info, ("version", "0.1.0")))] == 1
    # Read live: a later change shows in the next scrape.
    stats.published_by_source["public.outbox"]["outbox.event.order"] += 1
    stats.tracker = None
    m = samples(stats)
    assert m[("cdc_relay_events_published_total", (table, ("topic", "outbox.event.order")))] == 6
    assert m[("cdc_relay_in_flight_events", ())] == 0


def test_unknown_lag_and_wal_status_are_absent_not_zero():
    m = samples(RelayStats())
    assert not any(name == "cdc_relay_replication_lag_bytes" for name, _ in m)
    assert not any(name == "cdc_relay_slot_wal_status" for name, _ in m)


def test_every_exposed_series_is_in_metric_names():
    stats = RelayStats()
    stats.published_by_source["public.outbox"] = {"t": 1}
    stats.slot_lag_bytes, stats.slot_wal_status = 0, "reserved"
    stats.latency.observe(0.2)
    exposed = {name for name, _ in samples(stats, ScheduledStats())}
    assert exposed == METRIC_NAMES
    assert all(name.startswith("cdc_relay_") for name in exposed)


def test_scheduled_series_only_when_scheduled_events_are_on():
    off = {name for name, _ in samples(RelayStats())}
    assert not {name for name in off if name.startswith("cdc_relay_scheduled_")}
    scheduled = ScheduledStats(moved_total=3)
    scheduled.sampled(scheduled=5, due=2, overdue=1, oldest_due_age_seconds=7.5, now_unix=100.0)
    m = samples(RelayStats(), scheduled)
    assert m[("cdc_relay_scheduled_moved_total", ())] == 3
    assert m[("cdc_relay_scheduled_overdue_events", ())] == 1
    assert m[("cdc_relay_scheduled_oldest_due_age_seconds", ())] == 7.5


def test_histogram_buckets_are_cumulative_and_inclusive():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert histogram.count == 4 and histogram.sum == pytest.approx(3.65)
    m = samples(RelayStats(latency=histogram))
    assert m[("cdc_relay_end_to_end_latency_seconds_bucket", (("le", "0.1"),))] == 2
    assert m[("cdc_relay_end_to_end_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert m[("cdc_relay_end_to_end_latency_seconds_count", ())] == 4


class Ack:
    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def __len__(self) -> int:
        return 1


def test_latency_is_observed_once_per_transaction_at_its_last_ack():
    stats = RelayStats()
    pipeline = Pipeline(
        PipelineConfig(outbox_table=("public", "outbox")),
        start=Lsn(1),
        stats=stats,
        wall_clock=time.time,
    )
    assert stats.tracker is pipeline.tracker
    assert pipeline.feed(frames.relation()) is None
    pipeline.feed(frames.begin(0x20, commit_time=pg_time_us(time.time() - 2.0)))
    records = [pipeline.feed(frames.insert(frames.outbox_row(f"k{i}"), 0x10 + i)) for i in (0, 1)]
    delivery = pipeline.delivery
    assert delivery is not None and all(isinstance(r, OutboxRecord) for r in records)
    delivery(None, Ack())
    pipeline.feed(frames.commit(0x20, 0x30))
    assert stats.latency.count == 0  # one record still in flight
    delivery(None, Ack())
    assert stats.latency.count == 1
    assert 1.5 < stats.latency.sum < 60
    assert stats.last_ack_unix > time.time() - 60
    assert pipeline.confirmed == 0x30


def test_health_goes_stale_and_readiness_needs_streaming_and_a_broker():
    stats = RelayStats()
    assert health(stats) == (True, "ok")
    ok, reason = health(stats, now=stats.heartbeat + HEARTBEAT_STALE_SECONDS + 1)
    assert not ok and "silent" in reason
    assert readiness(stats)[0] is False
    stats.streaming = True
    ok, reason = readiness(stats)
    assert not ok and "Kafka" in reason
    stats.broker_reachable = True
    assert readiness(stats) == (True, "ok")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_server_serves_metrics_and_probes_then_stops():
    stats = RelayStats()
    server = MetricsServer("127.0.0.1", 0, stats, registry_for(stats, slot="s", publication="p"))
    server.start()
    try:
        status, body = get(server.port, "/metrics")
        assert status == 200 and "cdc_relay_events_dead_lettered_total 0.0" in body
        assert get(server.port, "/healthz") == (200, "ok\n")
        assert get(server.port, "/readyz")[0] == 503
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_port_in_use_is_a_one_line_relay_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stats = RelayStats()
        with pytest.raises(RelayError, match=f"127.0.0.1:{port}") as caught:
            MetricsServer("127.0.0.1", port, stats, registry_for(stats, slot="s", publication="p"))
    assert "\n" not in str(caught.value)
