"""Crash loop: concurrent writers while the relay is SIGKILLed at random moments and restarted,
publishing to the three-broker cluster (replication factor 3, min.insync.replicas 2) so that a
killed relay's in-flight batches are spread over several partition leaders.

Every inserted id must reach Kafka; per aggregate, the sequence numbers consumed (first
occurrence of each) are in commit order; duplicates stay within what was committed but not yet
confirmed at each kill (what PostgreSQL resends).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.faults import results
from tests.faults.helpers import Writers, measure_delivery, order_violations
from tests.faults.scale import EOS, delivery_modes, named, sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    current_lsn,
    execute,
    slot_active,
    wait_confirmed_past,
)
from tests.integration.test_observe import scrape
from tests.kafka_helpers import consume_all
from tests.kafka_servers import KafkaCluster
from tests.servers import free_port, wait_until

MAX_IN_FLIGHT = 2_000
SEED_ENV = "CDC_RELAY_FAULTS_SEED"


@pytest.mark.parametrize("delivery", delivery_modes())
def test_crash_loop_loses_nothing_and_keeps_aggregate_order(
    db: str, cluster: KafkaCluster, delivery: str
):
    size = sizes()
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))
    rng = random.Random(seed)
    kafka = cluster.bootstrap
    box = make_outbox(db, kafka, max_in_flight_events=MAX_IN_FLIGHT, delivery=delivery)
    Writers.prepare(db)
    writers = Writers(
        db, size.crash_loop_events, size.crash_loop_writers, size.crash_loop_seconds, seed
    )
    kills: list[tuple[float, int]] = []  # (monotonic time of the kill, confirmed LSN after it)
    recoveries: list[float] = []
    with RelayProcess(box.env) as relay:
        wait_until(lambda: slot_active(db), 60)
        writers.start()
        while writers.alive() or len(kills) < size.crash_loop_kills:
            # Let this incarnation make progress, then kill it at a random moment.
            time.sleep(rng.uniform(0.3, 2.0))
            relay.kill()
            killed_at = time.monotonic()
            confirmed = confirmed_lsn(db)
            kills.append((killed_at, confirmed))
            relay.start()
            restarted = time.monotonic()
            # Recovery: from the restart to the first confirmation past the kill's position
            # (or an active slot when there was nothing left to confirm).
            wait_until(
                lambda c=confirmed: (
                    confirmed_lsn(db) > c or (slot_active(db) and current_lsn(db) <= c)
                ),
                120,
                message="the restarted relay confirmed nothing",
            )
            recoveries.append(time.monotonic() - restarted)
        writers.join(30)
        end = current_lsn(db)
        wait_confirmed_past(db, end, timeout=300)
        assert relay.running()
        assert relay.stop() == 0
        log = relay.log()
    assert "Traceback" not in log

    delivered = measure_delivery(db, kafka, box.topic(), timeout=180)
    assert len(delivered.inserted) == size.crash_loop_events
    records, lost, duplicates = delivered.records, delivered.lost, delivered.duplicates

    # What PostgreSQL may resend after kill k: transactions committed before it whose commit
    # may lie past the confirmed position (their end LSN is not known to be at or before it).
    resendable = sum(
        sum(t.events for t in writers.txns if t.commit_started < at and t.end_upper > lsn)
        for at, lsn in kills
    )

    out_of_order = order_violations(records, consecutive=True)

    results.record(
        named("crash loop (SIGKILL)", delivery),
        **delivered.figures,
        faults=f"{len(kills)} SIGKILLs, {size.crash_loop_writers} writers, seed {seed}; 3 brokers",
        recovery_s=max(recoveries),
        notes=f"resendable at the kills: {resendable}; median recovery "
        f"{sorted(recoveries)[len(recoveries) // 2]:.1f} s",
        seed=seed,
    )
    print(f"crash loop seed {seed}: duplicates {duplicates}, resendable {resendable}")
    assert len(kills) >= size.crash_loop_kills
    assert lost == 0, f"seed {seed}: {lost} events lost"
    assert not out_of_order, f"seed {seed}: {out_of_order[:3]}"
    assert duplicates <= resendable, f"seed {seed}: {duplicates} > {resendable}"
    if delivery == EOS:
        assert duplicates == 0, f"seed {seed}: {duplicates} duplicates in exactly-once mode"


@pytest.mark.parametrize("delivery", delivery_modes())
def test_a_crash_inside_a_large_transaction_resends_what_of_it_was_acknowledged(
    db: str, kafka: str, delivery: str
):
    """Bug 9: the README's duplicate bound ("what was in flight plus one status interval") is
    wrong for large transactions. Only whole transactions are confirmed, so a crash in the
    middle of one sends again every event of it that Kafka had already acknowledged: up to the
    whole transaction. Measured here: the duplicates equal what had landed before the kill."""
    rows = sizes().large_txn_rows
    box = make_outbox(db, kafka, max_in_flight_events=MAX_IN_FLIGHT, delivery=delivery)
    port = free_port()
    env = {**box.env, "CDC_RELAY_HTTP_PORT": str(port)}
    execute(
        db,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "SELECT gen_random_uuid(), 'order', 'a-' || (n % 1000), 'Tested', "
        f"jsonb_build_object('seq', n) FROM generate_series(0, {rows - 1}) AS n",
    )
    end = current_lsn(db)
    with RelayProcess(env) as relay:

        def acknowledged() -> float:
            metrics = scrape(port)
            topic = (("table", "public.outbox"), ("topic", box.topic()))
            return metrics.get(("cdc_relay_events_published_total", topic), 0) - metrics.get(
                ("cdc_relay_in_flight_events", ()), 0
            )

        wait_until(lambda: acknowledged() >= rows // 2, 300, interval=0.01)
        relay.kill()
        assert confirmed_lsn(db) < end  # nothing of the transaction was confirmed
        landed = len(consume_all(kafka, [box.topic()], timeout=60, idle=2))
        relay.start()
        wait_confirmed_past(db, end, timeout=600)
        assert relay.stop() == 0
    delivered = measure_delivery(db, kafka, box.topic(), timeout=600)
    results.record(
        named("crash inside one large transaction", delivery),
        **delivered.figures,
        faults=f"SIGKILL after {landed:,} of its {rows:,} events had landed",
        recovery_s=None,
        notes="at-least-once: duplicates = what of the transaction had landed before the kill"
        if delivery != EOS
        else "exactly-once: what had been committed (Kafka transactions of part of it) is "
        "not sent again",
    )
    assert delivered.lost == 0
    assert landed < rows
    if delivery == EOS:
        assert delivered.duplicates == 0
    else:
        assert delivered.duplicates == landed
