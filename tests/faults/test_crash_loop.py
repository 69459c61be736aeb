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

from tests.faults import results
from tests.faults.helpers import Writers, measure_delivery, order_violations
from tests.faults.scale import sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    current_lsn,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_servers import KafkaCluster
from tests.servers import wait_until

MAX_IN_FLIGHT = 2_000
SEED_ENV = "CDC_RELAY_FAULTS_SEED"


def test_crash_loop_loses_nothing_and_keeps_aggregate_order(db: str, cluster: KafkaCluster):
    size = sizes()
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))
    rng = random.Random(seed)
    kafka = cluster.bootstrap
    box = make_outbox(db, kafka, max_in_flight_events=MAX_IN_FLIGHT)
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
        "crash loop (SIGKILL)",
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
