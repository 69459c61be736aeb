"""Failures the relay must ride out without losing anything: broker outage, a cut replication
connection, a second relay on the same slot."""

from __future__ import annotations

import json
import time

from tests.integration.conftest import Outbox, make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    execute,
    insert_events,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import wait_until


def reply_time(url: str):
    rows = query(
        url, "SELECT reply_time FROM pg_stat_replication WHERE application_name = 'cdc-relay'"
    )
    return rows[0][0] if rows else None


def test_slot_holds_while_the_broker_is_unreachable_and_advances_after(db: str, proxied_kafka):
    # A short wal_sender_timeout and a small in-flight bound: during the outage the relay
    # stops reading the socket (backpressure), so only its own status updates keep the
    # server from dropping the connection (invariant 6).
    execute(db, f"ALTER DATABASE \"{db.rsplit('/', 1)[1]}\" SET wal_sender_timeout = '3s'")
    box = make_outbox(db, proxied_kafka.bootstrap, max_in_flight_events=50)
    with RelayProcess(box.env) as relay:
        first_end = insert_events(db, count=100, per_txn=10)
        wait_confirmed_past(db, first_end)
        walsender = query(db, "SELECT active_pid FROM pg_replication_slots")[0][0]

        proxied_kafka.proxy.cut()
        cut_at = time.monotonic()
        # The first undelivered transaction ends at or before this position. The slot may
        # still creep forward through idle keepalives (WAL of no outbox transaction) up to
        # just before it, but never reach it.
        first_undelivered_end = insert_events(db, count=10, per_txn=10, start=100)
        second_end = insert_events(db, count=490, per_txn=10, start=110)
        replies = {reply_time(db)}

        def outage_long_enough() -> bool:
            replies.add(reply_time(db))
            assert confirmed_lsn(db) < first_undelivered_end, "the slot passed undelivered events"
            return time.monotonic() - cut_at > 8 and len(replies) >= 4

        # Over more than twice wal_sender_timeout: the slot never moves past undelivered
        # events, status updates keep coming, and the walsender is the same process.
        wait_until(outage_long_enough, 60, interval=0.25)
        assert query(db, "SELECT active_pid FROM pg_replication_slots")[0][0] == walsender
        assert relay.running()

        proxied_kafka.proxy.restore()
        wait_confirmed_past(db, second_end, timeout=120)
        assert relay.running(), "the relay must recover without a restart"
        assert relay.stop() == 0
        output = relay.log()
    assert "Traceback" not in output and "reconnecting" not in output
    records = consume_all(proxied_kafka.bootstrap, [box.topic()], timeout=60, idle=3)
    seqs = {json.loads(r.value or b"")["seq"] for r in records}
    assert seqs == set(range(600))


def test_replication_connection_cut_by_the_server_recovers(outbox: Outbox, kafka: str):
    with RelayProcess(outbox.env) as relay:
        end = insert_events(outbox.url, count=200, per_txn=20)
        wait_confirmed_past(outbox.url, end)
        for round_ in range(3):
            wait_until(lambda: slot_active(outbox.url), 60)
            execute(
                outbox.url,
                "SELECT pg_terminate_backend(active_pid) FROM "
                "pg_replication_slots WHERE slot_name = 'cdc_relay'",
            )
            end = insert_events(outbox.url, count=100, per_txn=10, start=200 + 100 * round_)
            wait_confirmed_past(outbox.url, end, timeout=90)
        assert relay.running()
        assert relay.stop() == 0
        output = relay.log()
    assert output.count("reconnecting") >= 1
    records = consume_all(kafka, [outbox.topic()], timeout=60, idle=3)
    assert {json.loads(r.value or b"")["seq"] for r in records} == set(range(500))


def test_a_second_relay_waits_as_hot_standby_and_takes_over(outbox: Outbox, kafka: str):
    env = {**outbox.env, "CDC_RELAY_STANDBY_RETRY_SECONDS": "0.5"}
    with RelayProcess(env) as active:
        wait_until(lambda: slot_active(outbox.url), 30)
        active_pid = query(outbox.url, "SELECT active_pid FROM pg_replication_slots")[0][0]
        with RelayProcess(env) as standby:
            wait_until(lambda: "hot standby" in standby.log(), 30)
            end = insert_events(outbox.url, count=300, per_txn=10)
            wait_confirmed_past(outbox.url, end)
            active.kill()
            end = insert_events(outbox.url, count=300, per_txn=10, start=300)
            wait_confirmed_past(outbox.url, end, timeout=60)
            new_pid = query(outbox.url, "SELECT active_pid FROM pg_replication_slots")[0][0]
            assert new_pid != active_pid
            assert standby.stop() == 0
            assert standby.log().count("hot standby") == 1  # logged once, not per retry
    records = consume_all(kafka, [outbox.topic()], timeout=60, idle=3)
    assert {json.loads(r.value or b"")["seq"] for r in records} == set(range(600))


def test_a_final_delivery_failure_replays_from_the_slot(db: str, proxied_kafka):
    # A short message timeout turns the outage into final delivery failures: the relay must
    # reset the pipeline and replay from the confirmed position, not skip anything.
    box = make_outbox(
        db,
        proxied_kafka.bootstrap,
        kafka_config='{"message.timeout.ms": 2000}',
        reconnect_max_backoff_seconds=1,
    )
    with RelayProcess(box.env) as relay:
        first_end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, first_end)
        proxied_kafka.proxy.cut()
        second_end = insert_events(db, count=200, per_txn=10, start=50)
        wait_until(lambda: "delivery to topic" in relay.log(), 60, message="no delivery failure")
        assert confirmed_lsn(db) < second_end
        proxied_kafka.proxy.restore()
        wait_confirmed_past(db, second_end, timeout=120)
        assert relay.running()
        assert relay.stop() == 0
        output = relay.log()
    assert output.count("delivery to topic") == 1, "the failure is logged once, not per event"
    records = consume_all(proxied_kafka.bootstrap, [box.topic()], timeout=60, idle=3)
    assert {json.loads(r.value or b"")["seq"] for r in records} == set(range(250))


def test_postgres_restart_mid_stream_is_survived(restartable_pg, db: str, kafka: str):
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=2_000, per_txn=20)
        wait_until(lambda: confirmed_lsn(db) > 0, 30)
        restartable_pg.restart(mode="fast")
        end = insert_events(db, count=1_000, per_txn=20, start=2_000)
        wait_confirmed_past(db, end, timeout=120)
        assert relay.running()
        assert relay.stop() == 0
    records = consume_all(kafka, [box.topic()], timeout=60, idle=3)
    assert {json.loads(r.value or b"")["seq"] for r in records} == set(range(3_000))
