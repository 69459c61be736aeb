"""Broker failures on the three-broker cluster (replication factor 3, min.insync.replicas 2,
unclean leader election off; tests/faults/conftest.py): the leader of the busiest partition
SIGKILLed and restarted, again and again; all three brokers killed mid-stream and started again;
two brokers down, so that min.insync.replicas cannot be met; and the relay on a SASL_SSL
listener (SCRAM-SHA-512 over TLS).

The relay is never restarted here: it must ride every failure out by itself. Each scenario
records its figures (tests/faults/results.py), loses nothing, and delivers every aggregate's
events in commit order (first occurrences, in partition order).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from tests.faults import results
from tests.faults.conftest import SCRAM_USER
from tests.faults.helpers import (
    Writers,
    measure_delivery,
    order_violations,
    relay_warnings,
    reply_time,
    set_wal_sender_timeout,
)
from tests.faults.scale import EOS, delivery_modes, named, sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    current_lsn,
    insert_events,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_servers import KafkaCluster, new_scram_password
from tests.servers import wait_until

MAX_IN_FLIGHT = 2_000
WRITERS = 4
SEED_ENV = "CDC_RELAY_FAULTS_SEED"
# While no ack comes the relay leaves the socket unread: its own status updates must keep the
# walsender from dropping it. A short timeout proves they continue.
WAL_SENDER_TIMEOUT_S = 4
ACTIVE_PID = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_relay'"


def seed() -> int:
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))


def writers_for(db: str, seed_: int) -> Writers:
    """Writers at the scale's rate with room for far longer than a scenario takes: scenarios
    stop them when their faults are done."""
    budget_s = 900
    Writers.prepare(db)
    return Writers(db, sizes().cluster_write_rate * budget_s, WRITERS, budget_s, seed_)


def wait_streaming(db: str, timeout: float = 60) -> None:
    """Until the slot confirms something new: events flow end to end."""
    before = confirmed_lsn(db)
    wait_until(lambda: confirmed_lsn(db) > before, timeout, message="nothing was confirmed")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@pytest.mark.parametrize("delivery", delivery_modes())
def test_leader_of_the_busiest_partition_killed_and_restarted(
    db: str, cluster: KafkaCluster, delivery: str
):
    size = sizes()
    seed_ = seed()
    box = make_outbox(db, cluster.bootstrap, max_in_flight_events=MAX_IN_FLIGHT, delivery=delivery)
    topic = box.topic()
    cluster.create_topic(topic)  # 3 partitions, led by one broker each
    writers = writers_for(db, seed_)
    rounds: list[dict[str, Any]] = []
    with RelayProcess(box.env) as relay:
        wait_until(lambda: slot_active(db), 60)
        writers.start()
        for _ in range(size.leader_kills):
            wait_streaming(db)
            partition = cluster.busiest_partition(topic)
            leader = cluster.leader(topic, partition)
            committed = current_lsn(db)  # every transaction committed before the kill
            cluster.kill(leader)
            killed = time.monotonic()
            wait_until(
                lambda p=partition, dead=leader: cluster.leader(topic, p) not in (dead, -1),
                60,
                message=f"no new leader for partition {partition}",
            )
            failover_s = time.monotonic() - killed
            wait_confirmed_past(db, committed, timeout=120)
            recovery_s = time.monotonic() - killed
            assert relay.running(), relay.log()
            cluster.start(leader)
            cluster.wait_isr_full([topic])
            rounds.append(
                {
                    "broker": leader,
                    "partition": partition,
                    "failover_s": failover_s,
                    "recovery_s": recovery_s,
                }
            )
        writers.stop()
        writers.join()
        wait_confirmed_past(db, current_lsn(db), timeout=180)
        assert relay.running()
        assert relay.stop() == 0
        log = relay.log()
    delivered = measure_delivery(db, cluster.bootstrap, topic, timeout=180)
    violations = order_violations(delivered.records, consecutive=True)
    recoveries = [r["recovery_s"] for r in rounds]
    results.record(
        named("partition leader SIGKILLed (3 brokers)", delivery),
        **delivered.figures,
        faults=f"{len(rounds)} SIGKILLs of the busiest partition's leader, each restarted; "
        f"{WRITERS} writers, seed {seed_}",
        recovery_s=max(recoveries),
        notes="recovery: kill until everything committed before it is confirmed (median "
        f"{median(recoveries):.1f} s; new leader elected after median "
        f"{median([r['failover_s'] for r in rounds]):.1f} s); brokers killed "
        f"{[r['broker'] for r in rounds]}; the relay was never restarted; relay warnings: "
        f"{relay_warnings(log) or 'none'}",
        rounds=rounds,
        seed=seed_,
    )
    assert "Traceback" not in log, log
    assert delivered.lost == 0, f"seed {seed_}: {delivered.lost} events lost"
    assert not violations, f"seed {seed_}: {violations[:3]}"
    if delivery == EOS:
        assert delivered.duplicates == 0


def test_all_three_brokers_killed_mid_stream_and_started_again(db: str, cluster: KafkaCluster):
    size = sizes()
    seed_ = seed()
    set_wal_sender_timeout(db, WAL_SENDER_TIMEOUT_S)
    box = make_outbox(db, cluster.bootstrap, max_in_flight_events=MAX_IN_FLIGHT)
    topic = box.topic()
    cluster.create_topic(topic)
    writers = writers_for(db, seed_)
    with RelayProcess(box.env) as relay:
        wait_until(lambda: slot_active(db), 60)
        writers.start()
        wait_streaming(db)
        sender = query(db, ACTIVE_PID)[0][0]
        for n in cluster.broker_ids:
            cluster.kill(n)
        killed = time.monotonic()
        # The first transaction that commits after the kill cannot be acknowledged before the
        # brokers are back: the slot must stay before its end.
        first_after = wait_until(
            lambda: next((t for t in list(writers.txns) if t.commit_started > killed), None), 30
        )
        replies = {reply_time(db)}

        def outage_over() -> bool:
            replies.add(reply_time(db))
            assert confirmed_lsn(db) < first_after.end_upper, "the slot passed unacked events"
            assert relay.running(), "the relay stopped during the outage"
            return time.monotonic() - killed >= size.all_down_seconds

        wait_until(outage_over, size.all_down_seconds + 60, interval=0.25)
        written_during = writers.committed()
        restarted = time.monotonic()
        cluster.start()  # all three, with their data
        registered_s = time.monotonic() - restarted
        wait_until(lambda: confirmed_lsn(db) >= first_after.end_upper, 180)
        first_ack_s = time.monotonic() - restarted
        writers.stop()
        writers.join()
        wait_confirmed_past(db, current_lsn(db), timeout=180)
        recovery_s = time.monotonic() - restarted
        same_sender = query(db, ACTIVE_PID)[0][0] == sender
        assert relay.running(), "the relay must recover without a restart"
        assert relay.stop() == 0
        log = relay.log()
    delivered = measure_delivery(db, cluster.bootstrap, topic, timeout=180)
    violations = order_violations(delivered.records, consecutive=True)
    results.record(
        "all 3 brokers SIGKILLed",
        **delivered.figures,
        faults=f"every broker SIGKILLed mid-stream, started again after "
        f"{size.all_down_seconds:.0f} s; {WRITERS} writers, seed {seed_}",
        recovery_s=recovery_s,
        notes=f"recovery: brokers started until all confirmed (brokers registered after "
        f"{registered_s:.1f} s, first confirmation after {first_ack_s:.1f} s); "
        f"{len(replies) - 1} distinct status replies during the outage; walsender kept: "
        f"{same_sender}; {written_during} events committed by then; relay warnings: "
        f"{relay_warnings(log) or 'none'}",
        seed=seed_,
    )
    assert "Traceback" not in log, log
    assert same_sender, "the replication connection was replaced during the outage"
    assert len(replies) - 1 >= size.all_down_seconds / WAL_SENDER_TIMEOUT_S
    assert delivered.lost == 0, f"seed {seed_}: {delivered.lost} events lost"
    assert not violations, f"seed {seed_}: {violations[:3]}"


def probe_error(bootstrap: str, topic: str) -> str:
    """What one acks=all record gets with no retries: the broker's own answer."""
    errors: list[Any] = []
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": False,
            "retries": 0,
            "message.timeout.ms": 10_000,
            "log_level": 0,
        }
    )
    producer.produce(topic, b"probe", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    return errors[0].name() if errors and errors[0] is not None else "delivered"


def test_two_brokers_down_holds_back_on_not_enough_replicas_and_resumes(
    db: str, cluster: KafkaCluster
):
    size = sizes()
    set_wal_sender_timeout(db, WAL_SENDER_TIMEOUT_S)
    box = make_outbox(db, cluster.bootstrap, max_in_flight_events=MAX_IN_FLIGHT)
    topic = box.topic()
    probe_topic = f"{box.prefix}.probe"
    cluster.create_topic(topic)
    cluster.create_topic(probe_topic, partitions=1)
    survivor, *down = cluster.broker_ids
    peak = 0.0
    with RelayProcess(box.env) as relay:
        first_end = insert_events(db, count=1_000, per_txn=10)
        wait_confirmed_past(db, first_end)
        for n in down:
            cluster.kill(n)
        killed = time.monotonic()
        # The controller fences the dead brokers and shrinks the ISRs to the survivor; then
        # every acks=all produce is refused: min.insync.replicas cannot be met.
        wait_until(lambda: cluster.registered_brokers() == {survivor}, 60)
        probes: list[str] = []
        refused = KafkaError(KafkaError.NOT_ENOUGH_REPLICAS).name()
        wait_until(
            lambda: (
                probes.append(probe_error(cluster.bootstrap, probe_topic)) or probes[-1] == refused
            ),
            90,
            message=lambda: f"acks=all records were not refused for want of replicas: {probes}",
        )
        isr = {p: s.isr for p, s in cluster.partition_states(topic).items()}
        first_undelivered_end = insert_events(db, count=10, per_txn=10, start=1_000)
        last_end = insert_events(
            db, count=size.two_down_backlog, per_txn=100, start=1_010, aggregates=1_000
        )
        replies = {reply_time(db)}

        def outage_over() -> bool:
            nonlocal peak
            peak = max(peak, relay.peak_rss_mb())
            replies.add(reply_time(db))
            assert confirmed_lsn(db) < first_undelivered_end, "the slot passed unacked events"
            assert relay.running(), "the relay stopped during the outage"
            return time.monotonic() - killed >= size.two_down_seconds

        wait_until(outage_over, size.two_down_seconds + 60, interval=0.25)
        restarted = time.monotonic()
        cluster.start(down[0])  # two in sync again: enough
        registered_s = time.monotonic() - restarted

        def drained() -> bool:
            nonlocal peak
            peak = max(peak, relay.peak_rss_mb())
            return confirmed_lsn(db) >= last_end

        wait_until(lambda: confirmed_lsn(db) >= first_undelivered_end, 120)
        first_ack_s = time.monotonic() - restarted
        wait_until(drained, 300, interval=0.2, message="the backlog did not drain")
        recovery_s = time.monotonic() - restarted
        assert relay.running(), "the relay must resume by itself"
        assert relay.stop() == 0
        log = relay.log()
    delivered = measure_delivery(db, cluster.bootstrap, topic, timeout=180)
    violations = order_violations(delivered.records, consecutive=False)
    results.record(
        "2 of 3 brokers down (min ISR not met)",
        **delivered.figures,
        faults=f"brokers {down} SIGKILLed for {size.two_down_seconds:.0f} s, "
        f"{size.two_down_backlog} events written meanwhile; one started again",
        recovery_s=recovery_s,
        notes=f"a probe record (acks=all, no retries) got {probes[-1]}; ISR during the "
        f"outage {isr}; first confirmation {first_ack_s:.1f} s after broker {down[0]} "
        f"was started (registered after {registered_s:.1f} s); {len(replies) - 1} distinct "
        f"status replies; peak RSS {peak:.0f} MB; relay warnings: {relay_warnings(log) or 'none'}",
        peak_rss_mb=peak,
    )
    assert "Traceback" not in log, log
    assert len(replies) - 1 >= size.two_down_seconds / WAL_SENDER_TIMEOUT_S
    # Python, librdkafka and the bounded in-flight data; a backlog-sized buffer would not fit.
    assert peak < 150, f"peak RSS {peak:.0f} MB"
    assert delivered.lost == 0
    assert delivered.seqs() == set(range(1_010 + size.two_down_backlog))
    assert not violations, violations[:3]


def test_sasl_ssl_scram_delivers_and_no_password_is_ever_shown(db: str, cluster: KafkaCluster):
    assert cluster.tls is not None
    password = cluster.scram_users[SCRAM_USER]
    config = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": SCRAM_USER,
        "sasl.password": password,
        "ssl.ca.location": str(cluster.tls.ca_pem),
    }
    # The listener really is TLS with the test CA: trusting only the system's CAs, the same
    # client cannot even fetch metadata.
    untrusting = Producer(
        {**{k: v for k, v in config.items() if k != "ssl.ca.location"}, "log_level": 0}
        | {"bootstrap.servers": cluster.sasl_bootstrap}
    )
    with pytest.raises(KafkaException):
        untrusting.list_topics(timeout=5)
    box = make_outbox(db, cluster.sasl_bootstrap, kafka_config=json.dumps(config))
    events = 1_000
    outputs: dict[str, str] = {}
    with RelayProcess(box.env, "--debug") as relay:
        end = insert_events(db, count=events, per_txn=10)
        wait_confirmed_past(db, end)
        for args in (["status"], ["status", "--json"]):
            done = cli(box.env, *args)
            assert done.returncode == 0, done.stderr
            outputs[" ".join(args)] = done.stdout + done.stderr
        assert relay.stop() == 0
        outputs["run --debug"] = relay.log()

    # A wrong password at start is a configuration error (exit 2, one line naming the refusal):
    # waiting cannot fix it. The slot is never taken.
    wrong = new_scram_password()
    bad_env = {**box.env, "CDC_RELAY_KAFKA_CONFIG": json.dumps({**config, "sasl.password": wrong})}
    with RelayProcess(bad_env) as bad:
        code = bad.wait(120)
        assert not slot_active(db)
        outputs["run, wrong password"] = bad.log()
    done = cli(bad_env, "status")
    outputs["status, wrong password"] = done.stdout + done.stderr
    bad_log = outputs["run, wrong password"]
    errors = [line for line in bad_log.splitlines() if line.startswith("cdc-relay: error:")]
    said = errors[0].removeprefix("cdc-relay: error: ") if errors else "-"

    delivered = measure_delivery(db, cluster.bootstrap, box.topic())
    violations = order_violations(delivered.records, consecutive=False)
    shown = [name for name, text in outputs.items() if password in text or wrong in text]
    results.record(
        "SASL_SSL (SCRAM-SHA-512 over TLS)",
        **delivered.figures,
        faults="the relay on a SASL_SSL listener (test CA); then a wrong password",
        recovery_s=None,
        notes=f"password shown in: {shown or 'nothing'} (checked: {', '.join(outputs)}); "
        f"wrong password: exit {code}, {said[:120]}",
    )
    assert not shown, f"a password appears in {shown}"
    assert "Traceback" not in "".join(outputs.values())
    assert code == 2 and len(errors) == 1, bad_log[-2000:]
    assert "refused the relay's credentials" in errors[0], errors
    assert delivered.lost == 0 and delivered.duplicates == 0
    assert delivered.seqs() == set(range(events))
    assert not violations, violations[:3]
