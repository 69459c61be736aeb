"""The broker link fails: cut for a while (outage), or slowed down (latency) under a backlog.

Both run on the three-broker cluster (replication factor 3, min.insync.replicas 2, acks=all),
with every broker's client link behind its own proxy: the whole cluster is partitioned from
the relay, or every link is slow, while the brokers still replicate among themselves.
"""

from __future__ import annotations

import time

from tests.faults import results
from tests.faults.helpers import measure_delivery, reply_time, set_wal_sender_timeout
from tests.faults.scale import sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    insert_events,
    query,
    wait_confirmed_past,
)
from tests.kafka_servers import KafkaCluster
from tests.servers import cpu_seconds, wait_until

# While Kafka is down the relay stops reading the socket; only its own status updates keep the
# walsender from dropping it. A short timeout proves they continue.
WAL_SENDER_TIMEOUT_S = 4


def walsender() -> str:
    return "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_relay'"


def test_broker_outage_holds_the_slot_stays_idle_and_recovers(db: str, cluster: KafkaCluster):
    size = sizes()
    set_wal_sender_timeout(db, WAL_SENDER_TIMEOUT_S)
    box = make_outbox(db, cluster.bootstrap, max_in_flight_events=500)
    with RelayProcess(box.env) as relay:
        first_end = insert_events(db, count=1_000, per_txn=10)
        wait_confirmed_past(db, first_end)
        sender = query(db, walsender())[0][0]

        cluster.cut()
        cut_at = time.monotonic()
        first_undelivered_end = insert_events(db, count=10, per_txn=10, start=1_000)
        last_end = insert_events(db, count=2_990, per_txn=10, start=1_010)
        # CPU is measured once the writes above are done and the relay has hit backpressure.
        cpu_from, cpu_at = cpu_seconds(relay.pid), time.monotonic()
        replies = {reply_time(db)}

        def outage_over() -> bool:
            replies.add(reply_time(db))
            assert confirmed_lsn(db) < first_undelivered_end, "the slot passed undelivered events"
            assert relay.running(), "the relay stopped during the outage"
            return time.monotonic() - cut_at >= size.outage_seconds

        wait_until(outage_over, size.outage_seconds + 60, interval=0.25)
        cpu_share = (cpu_seconds(relay.pid) - cpu_from) / (time.monotonic() - cpu_at)
        same_sender = query(db, walsender())[0][0] == sender

        cluster.restore()
        restored_at = time.monotonic()
        wait_until(lambda: confirmed_lsn(db) >= first_undelivered_end, 120)
        first_ack_s = time.monotonic() - restored_at
        wait_confirmed_past(db, last_end, timeout=180)
        all_delivered_s = time.monotonic() - restored_at
        assert relay.running(), "the relay must recover without a restart"
        assert relay.stop() == 0
        log = relay.log()

    delivered = measure_delivery(db, cluster.bootstrap, box.topic())
    results.record(
        "broker outage",
        **delivered.figures,
        faults=f"links to all 3 brokers cut for {size.outage_seconds:.0f} s",
        recovery_s=all_delivered_s,
        notes=f"first confirmation {first_ack_s:.1f} s after restore; relay CPU during the "
        f"outage {100 * cpu_share:.1f}% of a core; {len(replies) - 1} distinct status replies; "
        f"walsender kept: {same_sender}",
    )
    assert same_sender, "the replication connection was replaced during the outage"
    # One status update per status interval at least; the timeout never fired.
    assert len(replies) - 1 >= size.outage_seconds / WAL_SENDER_TIMEOUT_S
    assert cpu_share < 0.2, f"the relay spun during the outage: {100 * cpu_share:.0f}% CPU"
    assert "Traceback" not in log and "reconnecting" not in log
    assert delivered.lost == 0
    assert delivered.seqs() == set(range(4_000))


def test_slow_broker_drains_a_backlog_within_the_memory_bounds(db: str, cluster: KafkaCluster):
    size = sizes()
    max_bytes = 16 * 1024 * 1024
    box = make_outbox(
        db, cluster.bootstrap, max_in_flight_events=20_000, max_in_flight_bytes=max_bytes
    )
    end = insert_events(db, count=size.slow_broker_backlog, per_txn=1_000, aggregates=1_000)
    cluster.set_latency(size.slow_broker_latency_ms)
    peak = 0.0
    started = time.monotonic()
    with RelayProcess(box.env) as relay:

        def drained() -> bool:
            nonlocal peak
            peak = max(peak, relay.peak_rss_mb())
            return confirmed_lsn(db) >= end

        wait_until(drained, 900, interval=0.2, message="the backlog did not drain")
        drain_s = time.monotonic() - started
        peak = max(peak, relay.peak_rss_mb())
        assert relay.stop() == 0
        log = relay.log()
    cluster.set_latency(0)
    delivered = measure_delivery(db, cluster.bootstrap, box.topic(), timeout=600)
    events = len(delivered.inserted)
    results.record(
        "slow broker",
        **delivered.figures,
        faults=f"+{size.slow_broker_latency_ms:.0f} ms each way on the links to all 3 brokers",
        recovery_s=None,
        notes=f"backlog drained in {drain_s:.0f} s ({events / drain_s:.0f} events/s); "
        f"peak RSS {peak:.0f} MB with max_in_flight_bytes {max_bytes // 2**20} MB",
        peak_rss_mb=peak,
    )
    assert "Traceback" not in log
    assert delivered.lost == 0 and delivered.duplicates == 0
    # Python, librdkafka and the bounded in-flight data; a backlog-sized buffer would be GBs.
    assert peak < 150, f"peak RSS {peak:.0f} MB"
