"""A broker outage: the relay holds back and then delivers everything, never skipping.

The other failures (broker outage, cut replication connection, PostgreSQL restart, hot
standby) are scenarios of the fault suite in tests/faults."""

from __future__ import annotations

import json

from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    insert_events,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import wait_until


def test_a_broker_outage_is_backpressure_never_a_final_failure(db: str, proxied_kafka):
    """Bug 2: a final delivery failure (message.timeout.ms) could leave later records of a key
    acknowledged while earlier ones were replayed after them. The relay now never gives up on a
    record (message.timeout.ms=0, and other values are refused): an outage holds it back, and
    when the broker is back everything arrives, in order, without a reset."""
    box = make_outbox(db, proxied_kafka.bootstrap, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        first_end = insert_events(db, count=50, per_txn=10, aggregates=5)
        wait_confirmed_past(db, first_end)
        proxied_kafka.proxy.cut()
        second_end = insert_events(db, count=200, per_txn=10, start=50, aggregates=5)
        wait_until(lambda: "unreachable" in relay.log() or "Kafka:" in relay.log(), 60)
        assert confirmed_lsn(db) < second_end
        proxied_kafka.proxy.restore()
        wait_confirmed_past(db, second_end, timeout=120)
        assert relay.running()
        assert relay.stop() == 0
        output = relay.log()
    assert "delivery to topic" not in output and "reconnecting" not in output
    records = consume_all(proxied_kafka.bootstrap, [box.topic()], timeout=60, idle=3)
    assert {json.loads(r.value or b"")["seq"] for r in records} == set(range(250))
    for key in {r.key for r in records}:
        seqs = [json.loads(r.value or b"")["seq"] for r in records if r.key == key]
        first = list(dict.fromkeys(seqs))
        assert first == sorted(first), f"key {key!r} out of order: {first[:10]}"
