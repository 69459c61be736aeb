"""PostgreSQL side faults: server restart and crash, the walsender terminated, a hot standby
taking over from a killed relay."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults import results
from tests.faults.helpers import measure_delivery, order_violations
from tests.faults.scale import EOS, delivery_modes, named, sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    execute,
    insert_events,
    query,
    slot_active,
    wait_confirmed_past,
)
from tests.integration.test_observe import get
from tests.servers import TcpProxy, free_port, wait_until

ACTIVE_PID = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_relay'"


@pytest.mark.parametrize("delivery", delivery_modes())
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_or_crash_mid_stream(
    restartable_pg, db: str, kafka: str, mode: str, delivery: str
):
    size = sizes()
    half = size.pg_restart_events // 2
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1, delivery=delivery)
    with RelayProcess(box.env) as relay:
        quarter = insert_events(db, count=half // 2, per_txn=20)
        insert_events(db, count=half - half // 2, per_txn=20, start=half // 2)
        wait_confirmed_past(db, quarter)  # streaming: restart while the rest flows
        restartable_pg.restart(mode=mode)
        restarted = time.monotonic()
        wait_until(lambda: slot_active(db), 120, message="the relay did not reconnect")
        reconnect_s = time.monotonic() - restarted
        end = insert_events(db, count=size.pg_restart_events - half, per_txn=20, start=half)
        wait_confirmed_past(db, end, timeout=180)
        assert relay.running()
        assert relay.stop() == 0
        log = relay.log()
    delivered = measure_delivery(db, kafka, box.topic())
    results.record(
        named(
            f"PostgreSQL {'restart (-m fast)' if mode == 'fast' else 'crash (-m immediate)'}",
            delivery,
        ),
        **delivered.figures,
        faults=f"pg_ctl restart -m {mode} mid-stream",
        recovery_s=reconnect_s,
        notes="recovery: restart done until the relay holds the slot again",
    )
    assert "Traceback" not in log, log
    assert "reconnecting" in log, log
    assert delivered.lost == 0
    assert delivered.seqs() == set(range(size.pg_restart_events))
    if delivery == EOS:
        # PostgreSQL resends from the position it last saved; the progress record says what
        # of that is in Kafka already.
        assert delivered.duplicates == 0


def test_walsender_terminated_repeatedly_recovers_each_time(db: str, kafka: str):
    size = sizes()
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    recoveries = []
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=500, per_txn=20)
        wait_confirmed_past(db, end)
        for round_ in range(size.walsender_cuts):
            old = wait_until(lambda: query(db, ACTIVE_PID)[0][0], 60)
            execute(db, "SELECT pg_terminate_backend(%s)", (old,))
            cut = time.monotonic()
            # Events written while the relay is disconnected.
            end = insert_events(db, count=200, per_txn=10, start=500 + 200 * round_)
            wait_until(lambda o=old: query(db, ACTIVE_PID)[0][0] not in (None, o), 60)
            recoveries.append(time.monotonic() - cut)
            wait_confirmed_past(db, end, timeout=90)
        assert relay.running()
        assert relay.stop() == 0
        log = relay.log()
    total = 500 + 200 * size.walsender_cuts
    delivered = measure_delivery(db, kafka, box.topic())
    results.record(
        "walsender terminated",
        **delivered.figures,
        faults=f"pg_terminate_backend(walsender) x{size.walsender_cuts}",
        recovery_s=max(recoveries),
        notes="recovery: termination until a new walsender holds the slot (worst of all)",
    )
    assert "Traceback" not in log and log.count("reconnecting") >= size.walsender_cuts
    assert delivered.lost == 0
    assert delivered.seqs() == set(range(total))


@pytest.mark.parametrize("delivery", delivery_modes())
def test_hot_standby_takes_over_within_the_retry_interval(db: str, kafka: str, delivery: str):
    box = make_outbox(db, kafka, delivery=delivery)
    assert "CDC_RELAY_STANDBY_RETRY_SECONDS" not in box.env  # the default interval
    with RelayProcess(box.env) as active:
        wait_until(lambda: slot_active(db), 60)
        active_pid = query(db, ACTIVE_PID)[0][0]
        with RelayProcess(box.env) as standby:
            wait_until(lambda: "hot standby" in standby.log(), 60)
            first = insert_events(db, count=500, per_txn=10)
            insert_events(db, count=500, per_txn=10, start=500)
            wait_confirmed_past(db, first)  # streaming: kill while the rest flows
            active.kill()
            killed = time.monotonic()
            end = insert_events(db, count=1_000, per_txn=10, start=1_000)
            wait_until(lambda: query(db, ACTIVE_PID)[0][0] not in (None, active_pid), 60)
            takeover_s = time.monotonic() - killed
            wait_confirmed_past(db, end, timeout=90)
            assert standby.stop() == 0
            log = standby.log()
    delivered = measure_delivery(db, kafka, box.topic())
    results.record(
        named("hot standby takeover", delivery),
        **delivered.figures,
        faults="SIGKILL of the active relay, standby on the same slot",
        recovery_s=takeover_s,
        notes="recovery: kill until the standby holds the slot (default standby_retry_seconds)",
    )
    assert log.count("hot standby") == 1  # logged once, not per retry
    assert takeover_s <= 10, f"the standby took {takeover_s:.1f} s to take over"
    assert delivered.lost == 0
    if delivery == EOS:
        assert delivered.duplicates == 0


@pytest.mark.parametrize("delivery", delivery_modes())
def test_a_paused_relay_is_fenced_by_the_standby_that_takes_over(
    db: str, kafka: str, delivery: str
):
    """A zombie: the active relay stopped with SIGSTOP (a long GC pause, a frozen VM) while
    a standby takes its slot over, then resumed. In exactly-once mode it is fenced (the
    standby's producer registered the same transactional.id) and publishes nothing; in
    at-least-once mode it finds the slot taken and waits as a standby."""
    dbname = db.rsplit("/", 1)[1]
    execute(db, f"ALTER DATABASE \"{dbname}\" SET wal_sender_timeout = '3s'")
    box = make_outbox(db, kafka, delivery=delivery, standby_retry_seconds=1)
    events = sizes().pg_restart_events
    with RelayProcess(box.env) as zombie:
        wait_until(lambda: slot_active(db), 60)
        zombie_pid = query(db, ACTIVE_PID)[0][0]
        first = insert_events(db, count=events // 3, per_txn=10)
        wait_confirmed_past(db, first)
        insert_events(db, count=events // 3, per_txn=events // 3, start=events // 3)
        zombie.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        paused = time.monotonic()
        try:
            with RelayProcess(box.env) as standby:
                wait_until(lambda: query(db, ACTIVE_PID)[0][0] not in (None, zombie_pid), 60)
                takeover_s = time.monotonic() - paused
                end = insert_events(
                    db, count=events - 2 * (events // 3), per_txn=10, start=2 * (events // 3)
                )
                wait_confirmed_past(db, end, timeout=180)
                zombie.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                wait_until(lambda: not zombie.running() or "hot standby" in zombie.log(), 60)
                assert standby.stop() == 0
        finally:
            if zombie.running():
                zombie.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        zombie_log = zombie.log()
    delivered = measure_delivery(db, kafka, box.topic())
    results.record(
        named("zombie relay (SIGSTOP) while a standby takes over", delivery),
        **delivered.figures,
        faults="SIGSTOP of the active relay mid-transaction, standby takes the slot, SIGCONT",
        recovery_s=takeover_s,
        notes="the zombie "
        + ("was fenced and stopped" if "fenced" in zombie_log else "waits as a standby")
        + "; recovery: pause until the standby holds the slot (wal_sender_timeout 3 s)",
    )
    assert delivered.lost == 0 and "Traceback" not in zombie_log
    assert delivered.seqs() == set(range(events))
    if delivery == EOS:
        assert delivered.duplicates == 0


def test_a_half_open_replication_connection_is_noticed_and_replaced(pg, db: str, kafka: str):
    """Issue 11: a silent network drop (here a proxy that stops forwarding without closing
    anything) went unnoticed: TCP keepalives and tcp_user_timeout see nothing wrong with a
    proxy that still acknowledges. The relay asks the server for a reply after 10 s of silence
    and gives the connection up 10 s later; /readyz says 503 until it streams again."""
    box = make_outbox(db, kafka)
    with TcpProxy(pg.host, pg.port) as proxy:
        proxied = db.replace(f"@{pg.host}:{pg.port}/", f"@127.0.0.1:{proxy.port}/")
        assert proxied != db
        port = free_port()
        env = {
            **box.env,
            "CDC_RELAY_DATABASE_URL": proxied,
            "CDC_RELAY_HTTP_PORT": str(port),
            "CDC_RELAY_RECONNECT_MAX_BACKOFF_SECONDS": "1",
        }
        with RelayProcess(env) as relay:
            wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
            first = insert_events(db, count=200, per_txn=10)
            wait_confirmed_past(db, first)
            proxy.stall()
            stalled = time.monotonic()
            insert_events(db, count=300, per_txn=10, start=200)  # written during the partition
            wait_until(lambda: get(port, "/readyz")[0] == 503, 60, message=relay.log)
            noticed_s = time.monotonic() - stalled
            proxy.restore()
            restored = time.monotonic()
            end = insert_events(db, count=200, per_txn=10, start=500)
            wait_confirmed_past(db, end, timeout=120)
            recovered_s = time.monotonic() - restored
            wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
            assert relay.stop() == 0
            log = relay.log()
    delivered = measure_delivery(db, kafka, box.topic())
    violations = order_violations(delivered.records, consecutive=False)
    results.record(
        "replication connection half-open",
        **delivered.figures,
        faults="a proxy in front of PostgreSQL stops forwarding without closing",
        recovery_s=recovered_s,
        notes=f"noticed after {noticed_s:.1f} s (bound: 10 s without a frame, then 10 s "
        "without a reply); /readyz 503 meanwhile",
    )
    assert "presumed dead" in log and "Traceback" not in log
    assert noticed_s <= 30, f"noticed only after {noticed_s:.0f} s"
    assert delivered.lost == 0 and not violations, violations[:3]
