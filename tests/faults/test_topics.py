"""Broker-side limits below the relay's, and a topic that does not exist, on Apache Kafka.

- A topic whose ``max.message.bytes`` is smaller than one row's record: the broker refuses the
  whole batch that holds it, so the verdict cannot be taken for the other records in it. The
  relay replays the transaction one record at a time: only the record refused alone is
  dead-lettered (without its payload, its row kept for prune), every other one is delivered.
- ``auto.create.topics.enable=false`` and an event for a missing topic: one clear log line and
  a metric, nothing confirmed past it, nothing lost, and delivery resumes once the topic exists.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.faults import results
from tests.faults.helpers import measure_delivery, order_violations
from tests.faults.scale import EOS, delivery_modes, named
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    current_lsn,
    execute,
    insert_events,
    query,
    wait_confirmed_past,
)
from tests.integration.test_observe import scrape
from tests.kafka_helpers import consume_all, create_topic
from tests.kafka_servers import KafkaBroker
from tests.servers import free_port, wait_until

TOPIC_LIMIT = 8_192  # max.message.bytes of the topic: a batch larger than this is refused
# One row's payload: random hex (lz4 halves it, no more), larger than the topic takes even
# compressed, far below the client's 1 MB.
BIG = 32_000


SMALL = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "SELECT gen_random_uuid(), 'order', 'a-' || (n %% 20), 'Tested', "
    "jsonb_build_object('seq', n) FROM generate_series(%s::int, %s::int) AS n"
)
BIG_ROW = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "VALUES (%s, 'order', %s, 'Big', jsonb_build_object('seq', %s::int, 'pad', "
    "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, %s / 32))))"
)


@pytest.mark.parametrize("delivery", delivery_modes())
def test_a_record_over_the_topics_size_limit_is_dead_lettered_and_its_batch_mates_delivered(
    db: str, kafka: str, delivery: str
):
    """Also the issue's "final delivery failure forcing a reset": the refused batch makes the
    producer fatal (at-least-once) or its Kafka transaction abortable (exactly-once), and the
    relay replays."""
    box = make_outbox(db, kafka, delivery=delivery)
    create_topic(kafka, box.topic(), partitions=3, **{"max.message.bytes": str(TOPIC_LIMIT)})
    create_topic(kafka, box.dead_letter_topic)
    bigs = [str(uuid.uuid4()), str(uuid.uuid4())]
    with RelayProcess(box.env) as relay:
        first = insert_events(db, count=200, per_txn=20, aggregates=20)
        wait_confirmed_past(db, first)
        with psycopg.connect(db) as conn, conn.transaction():
            # Small events of many aggregates around one too large for the topic, in one
            # transaction: produced together, the big one shares a batch with small ones.
            conn.execute(SMALL, (200, 229))
            conn.execute(BIG_ROW, (bigs[0], "a-big", 230, BIG))
            conn.execute(SMALL, (231, 260))
        execute(db, BIG_ROW, (bigs[1], "a-alone", 261, BIG))  # a transaction of it alone
        end = insert_events(db, count=100, per_txn=10, start=262, aggregates=20)
        wait_confirmed_past(db, end, timeout=180)
        assert relay.stop() == 0
        log = relay.log()
    inserted = {str(row[0]) for row in query(db, "SELECT id FROM outbox")}
    good = consume_all(kafka, [box.topic()], timeout=60)
    dead = consume_all(kafka, [box.dead_letter_topic], expected=len(bigs), timeout=60)
    good_ids = {(r.header("id") or b"").decode() for r in good}
    dead_ids = {(r.header("id") or b"").decode() for r in dead}
    kept = {row[0] for row in query(db, "SELECT event_id FROM cdc_relay_kept")}
    lost = inserted - good_ids - dead_ids
    violations = order_violations(good, consecutive=False)
    results.record(
        named("topic max.message.bytes below a record (forces resets)", delivery),
        events=len(inserted),
        lost=len(lost),
        duplicates=len(good) - len(good_ids),
        faults=f"topic max.message.bytes {TOPIC_LIMIT}, {len(bigs)} rows of {BIG} bytes, one "
        "among small ones in one transaction",
        recovery_s=None,
        notes=f"dead-lettered {len(dead_ids)} (exactly the big rows: {dead_ids == set(bigs)}); "
        f"innocent batch-mates delivered: {not (dead_ids - set(bigs))}",
    )
    assert not lost, f"{len(lost)} events neither delivered nor dead-lettered"
    assert dead_ids == set(bigs), "only the rows too large for the topic are dead-lettered"
    assert good_ids == inserted - set(bigs)
    assert all(r.value is None for r in dead)  # too large for the topic: no payload
    assert kept == set(bigs)  # their rows are the only copies: prune keeps them
    assert not violations, violations[:3]
    assert "one record at a time" in log
    if delivery == EOS:
        assert len(good) == len(good_ids), "no duplicates in exactly-once mode"


@pytest.fixture
def closed_broker() -> Iterator[KafkaBroker]:
    """A broker that creates no topic on its own (auto.create.topics.enable=false)."""
    with KafkaBroker(auto_create_topics=False) as broker:
        yield broker


def test_a_missing_topic_holds_the_relay_until_it_is_created(db: str, closed_broker: KafkaBroker):
    bootstrap = closed_broker.bootstrap
    box = make_outbox(db, bootstrap, reconnect_max_backoff_seconds=2)
    create_topic(bootstrap, box.dead_letter_topic)
    port = free_port()
    env = {**box.env, "CDC_RELAY_HTTP_PORT": str(port)}
    with RelayProcess(env) as relay:
        first_missing = insert_events(db, count=10, per_txn=10)
        end = insert_events(db, count=190, per_txn=10, start=10)
        started = time.monotonic()
        wait_until(lambda: "does not exist" in relay.log(), 120, message=relay.log)
        noticed_s = time.monotonic() - started
        assert confirmed_lsn(db) < first_missing
        metrics = scrape(port)
        pipeline_errors = metrics[("cdc_relay_delivery_errors_total", (("kind", "pipeline"),))]
        assert pipeline_errors >= 1
        held_s = 10.0
        deadline = time.monotonic() + held_s
        while time.monotonic() < deadline:  # held back: nothing confirmed past the topic
            assert confirmed_lsn(db) < first_missing
            assert relay.running()
            time.sleep(0.5)
        create_topic(bootstrap, box.topic(), partitions=3)
        created = time.monotonic()
        wait_confirmed_past(db, end, timeout=180)
        resumed_s = time.monotonic() - created
        assert relay.stop() == 0
        log = relay.log()
    delivered = measure_delivery(db, bootstrap, box.topic())
    violations = order_violations(delivered.records, consecutive=False)
    missing_lines = [line for line in log.splitlines() if "does not exist" in line]
    results.record(
        "topic missing, auto-creation off",
        **delivered.figures,
        faults=f"no topic for {held_s + noticed_s:.0f} s, auto.create.topics.enable=false",
        recovery_s=resumed_s,
        notes=f"noticed after {noticed_s:.0f} s ({len(missing_lines)} log line(s): "
        f"{missing_lines[0].split(': ', 1)[-1][:120] if missing_lines else '-'}); "
        f"cdc_relay_delivery_errors_total{{kind=pipeline}} {pipeline_errors:.0f} when noticed; "
        "recovery: topic created until everything confirmed",
    )
    assert delivered.lost == 0 and not violations, violations[:3]
    assert json.loads(delivered.records[0].value or b"{}").get("seq") is not None
    assert len(missing_lines) == 1, "said once, not per retry"
    assert current_lsn(db) >= end
