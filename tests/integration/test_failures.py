"""A final delivery failure: the relay must replay from the slot, not skip anything.

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
