"""Exactly-once mode end to end (the smaller versions of the fault suite's scenarios): a
read_committed consumer sees every event once through relay kills inside and between
transactions, and a paused relay whose slot a standby took over is fenced and publishes
nothing."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

from tests.faults.helpers import order_violations
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    execute,
    insert_events,
    lsn_int,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import wait_until

ACTIVE_PID = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_relay'"


def counts(bootstrap: str, topic: str, expected: int) -> tuple[Counter[str], list]:
    records = consume_all(bootstrap, [topic], expected=expected, timeout=60, linger=1)
    return Counter((r.header("id") or b"").decode() for r in records), records


def test_kills_inside_and_between_transactions_deliver_every_event_once(db: str, kafka: str):
    box = make_outbox(db, kafka, delivery="exactly-once", transaction_max_events=500)
    with RelayProcess(box.env) as relay:
        wait_until(lambda: "streaming slot" in relay.log(), 60, message=relay.log)
        first = insert_events(db, count=1_000, per_txn=10)
        wait_confirmed_past(db, first)
        # One transaction of 20,000 events: split over Kafka transactions of 500, and the relay
        # killed three times while it goes through them.
        end = insert_events(db, count=20_000, per_txn=20_000, start=1_000, aggregates=50)
        for kill in range(3):
            time.sleep(0.5)
            relay.kill()
            relay.start()
            wait_until(lambda k=kill: relay.log().count("streaming slot") >= k + 2, 60)
        wait_confirmed_past(db, end, timeout=180)
        assert relay.stop() == 0
        log = relay.log()
    shown = cli(box.env, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    delivery = json.loads(shown.stdout)["delivery"]
    assert delivery["mode"] == "exactly-once" and delivery["recorded"] is not None
    assert first < lsn_int(delivery["recorded"]) <= end
    assert "recorded    " in cli(box.env, "status").stdout
    inserted = {str(row[0]) for row in query(db, "SELECT id FROM outbox")}
    seen, records = counts(kafka, box.topic(), len(inserted))
    assert set(seen) == inserted, f"{len(inserted - set(seen))} lost"
    assert max(seen.values()) == 1, f"{sum(n - 1 for n in seen.values())} duplicates\n{log}"
    assert not order_violations(records, consecutive=False)
    assert "recorded position" in log and "Traceback" not in log


def test_a_paused_relay_is_fenced_when_a_standby_takes_over_and_publishes_nothing(
    db: str, kafka: str
):
    dbname = db.rsplit("/", 1)[1]
    # The paused relay's walsender gives the slot up after 3 s of silence.
    execute(db, f"ALTER DATABASE \"{dbname}\" SET wal_sender_timeout = '3s'")
    box = make_outbox(db, kafka, delivery="exactly-once", standby_retry_seconds=1)
    with RelayProcess(box.env) as zombie:
        wait_until(lambda: slot_active(db), 60, message=zombie.log)
        first = insert_events(db, count=500, per_txn=10)
        wait_confirmed_past(db, first)
        zombie_pid = query(db, ACTIVE_PID)[0][0]
        # Paused in the middle of a large transaction: with a Kafka transaction open, most
        # likely (it commits 500 events at a time), that must never become visible.
        insert_events(db, count=5_000, per_txn=5_000, start=500)
        zombie.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with RelayProcess(box.env) as standby:
                wait_until(
                    lambda: query(db, ACTIVE_PID)[0][0] not in (None, zombie_pid),
                    60,
                    message=standby.log,
                )
                end = insert_events(db, count=500, per_txn=10, start=5_500)
                wait_confirmed_past(db, end, timeout=120)
                zombie.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                # Back, it finds itself fenced (it had a transaction open: it stops) or, if
                # it had none, it waits as a hot standby: either way it publishes nothing.
                wait_until(
                    lambda: not zombie.running() or "hot standby" in zombie.log(),
                    60,
                    message=zombie.log,
                )
                assert standby.stop() == 0
                standby_log = standby.log()
        finally:
            if zombie.running():
                zombie.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        zombie_log = zombie.log()
        if not zombie.running():
            assert zombie.wait(10) == 0, zombie.log()
            assert "fenced" in zombie_log and "publishes nothing more" in zombie_log
    seen, records = counts(kafka, box.topic(), 6_000)
    assert len(seen) == 6_000 and max(seen.values()) == 1, zombie_log
    assert {json.loads(r.value or b"{}")["seq"] for r in records} == set(range(6_000))
    assert "Traceback" not in zombie_log + standby_log


def test_the_progress_topic_is_made_with_one_compacted_partition(kafka: str, topic_name: str):
    """Found by the kill test: asking for the metadata of a missing topic made a broker with
    auto-creation create it with 3 partitions, and progress records hashed to another
    partition than the one read back."""
    from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

    from cdc_relay.adapters import progress
    from cdc_relay.errors import ConfigError
    from tests.kafka_helpers import create_topic

    config = {"bootstrap.servers": kafka}
    progress.ensure_topic(config, topic_name)
    admin = AdminClient(config)
    assert len(admin.list_topics(timeout=10).topics[topic_name].partitions) == 1
    resource = ConfigResource("topic", topic_name)
    described = admin.describe_configs([resource])[resource].result(10)
    assert described["cleanup.policy"].value == "compact"
    wide = f"{topic_name}-wide"
    create_topic(kafka, wide, partitions=3)
    try:
        progress.ensure_topic(config, wide)
    except ConfigError as exc:
        assert "has 3 partitions: it must have one" in str(exc)
    else:
        raise AssertionError("a progress topic of 3 partitions was accepted")
