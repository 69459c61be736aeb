"""Scheduled events through `cdc-relay run`: CDC_RELAY_SCHEDULED_TABLE set, the table made by
`setup --create-table`, events written with add_event(..., deliver_at=...), the mover started
by the relay that holds the slot. Checked from outside: Kafka, the tables, `status`."""

from __future__ import annotations

import contextlib
import random
import signal
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

import psycopg
import pytest

from cdc_relay.outbox import add_event
from cdc_relay.scheduled import ScheduledTable, cancel_event
from tests.integration.conftest import Outbox, make_outbox
from tests.integration.relay_process import RelayProcess, cli, query
from tests.kafka_helpers import ConsumedRecord, consume_all
from tests.servers import wait_until

SCHEDULED = "public.outbox_scheduled"
AGGREGATE_TYPE = "subscription"


@pytest.fixture
def scheduled_outbox(db: str, kafka: str) -> Outbox:
    return make_outbox(db, kafka, scheduled_table=SCHEDULED, scheduled_interval_seconds=0.5)


def server_now(url: str) -> datetime:
    return query(url, "SELECT now()")[0][0]  # type: ignore[no-any-return]


def schedule(url: str, plan: list[tuple[str, datetime]]) -> list[uuid.UUID]:
    """One event per (aggregate id, deliver_at), each its own transaction, in plan order."""
    ids = []
    with psycopg.connect(url, autocommit=True) as conn:
        for n, (aggregate, at) in enumerate(plan):
            with conn.transaction():
                ids.append(
                    add_event(
                        conn,
                        aggregate_type=AGGREGATE_TYPE,
                        aggregate_id=aggregate,
                        event_type="Expired",
                        payload={"n": n},
                        deliver_at=at,
                    )
                )
    return ids


def event_id(record: ConsumedRecord) -> uuid.UUID:
    return uuid.UUID((record.header("id") or b"").decode())


def first_occurrence_order(records: list[ConsumedRecord]) -> dict[bytes, list[uuid.UUID]]:
    """Per key, event ids in offset order, first occurrences only."""
    seen: set[uuid.UUID] = set()
    order: dict[bytes, list[uuid.UUID]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        eid = event_id(record)
        if eid not in seen:
            seen.add(eid)
            order[record.key or b""].append(eid)
    return order


def expected_order(
    plan: list[tuple[str, datetime]], ids: list[uuid.UUID]
) -> dict[bytes, list[uuid.UUID]]:
    """Per key: deliver_at order, then scheduling order."""
    order: dict[bytes, list[uuid.UUID]] = defaultdict(list)
    for n in sorted(range(len(plan)), key=lambda n: (plan[n][1], n)):
        order[plan[n][0].encode()].append(ids[n])
    return order


def test_setup_creates_the_table_and_the_relay_publishes_none_early_and_none_cancelled(
    scheduled_outbox: Outbox, kafka: str
):
    box = scheduled_outbox
    assert query(box.url, "SELECT to_regclass(%s) IS NOT NULL", (SCHEDULED,))[0][0]
    now = server_now(box.url)
    rng = random.Random(7)
    plan = [(f"s-{n % 10}", now + timedelta(seconds=rng.uniform(1.0, 6.0))) for n in range(200)]
    cancelled_plan = [("s-cancel", now + timedelta(seconds=3))]
    with RelayProcess(box.env) as relay:
        ids = schedule(box.url, plan)
        (cancelled,) = schedule(box.url, cancelled_plan)
        with psycopg.connect(box.url, autocommit=True) as conn, conn.transaction():
            assert cancel_event(conn, cancelled, table=ScheduledTable(SCHEDULED))
        records = consume_all(
            kafka, [box.topic(AGGREGATE_TYPE)], expected=len(plan), timeout=60, linger=1.0
        )
        status = cli(box.env, "status")
        assert relay.stop() == 0, relay.log()
    assert {event_id(r) for r in records} == set(ids), "every scheduled event, once"
    assert len(records) == len(plan)
    assert cancelled not in {event_id(r) for r in records}
    due = {ids[n]: plan[n][1] for n in range(len(plan))}
    # The outbox row's created_at is the move's time (docs/scheduled.md), to the microsecond.
    for moved_id, created_at in query(box.url, "SELECT id, created_at FROM outbox"):
        assert created_at >= due[moved_id], f"{moved_id} moved before its deliver_at"
    # The Kafka timestamp is that created_at, in milliseconds (truncated: up to 1 ms before).
    lateness = sorted(r.timestamp_ms / 1000 - due[event_id(r)].timestamp() for r in records)
    assert lateness[0] > -0.001, f"published {-lateness[0]:.3f} s before its time"
    assert lateness[-1] <= 2.0, f"published {lateness[-1]:.3f} s late"
    assert first_occurrence_order(records) == expected_order(plan, ids)
    assert query(box.url, f"SELECT count(*) FROM {SCHEDULED}")[0][0] == 0
    assert status.returncode == 0, status.stderr
    assert f"scheduled     {SCHEDULED}" in status.stdout, status.stdout
    print(
        f"lateness of {len(records)} events: p50 {lateness[len(lateness) // 2] * 1000:.0f} ms, "
        f"max {lateness[-1] * 1000:.0f} ms"
    )


def test_sigkill_of_the_relay_while_events_fall_due_loses_none_and_doubles_none_in_the_table(
    scheduled_outbox: Outbox, kafka: str
):
    box = scheduled_outbox
    now = server_now(box.url)
    rng = random.Random(11)
    plan = [(f"s-{n % 20}", now + timedelta(seconds=rng.uniform(1.0, 8.0))) for n in range(600)]
    ids = schedule(box.url, plan)
    kills = 0
    relay = RelayProcess(box.env)
    try:
        relay.start()
        deadline = time.monotonic() + 60
        while query(box.url, f"SELECT count(*) FROM {SCHEDULED}")[0][0] > 0:
            assert time.monotonic() < deadline, "scheduled events were not all moved"
            time.sleep(rng.uniform(0.5, 1.5))
            if kills < 4 and relay.running():
                relay.kill()
                kills += 1
                relay = RelayProcess(box.env)
                relay.start()
        records = consume_all(kafka, [box.topic(AGGREGATE_TYPE)], expected=len(plan), timeout=90)
        assert relay.stop() == 0, relay.log()
    finally:
        relay.kill()
    assert kills >= 3
    in_outbox = query(box.url, "SELECT id, count(*) FROM outbox GROUP BY id")
    assert {row[0] for row in in_outbox} == set(ids), "none lost on the way into the outbox"
    assert all(row[1] == 1 for row in in_outbox), "none doubled in the outbox"
    published = [event_id(r) for r in records]
    assert set(published) == set(ids), "none lost on the way to Kafka"
    print(f"{kills} SIGKILLs: {len(published) - len(set(published))} duplicates in Kafka")
    assert first_occurrence_order(records) == expected_order(plan, ids)


def test_a_hot_standby_moves_nothing(scheduled_outbox: Outbox, kafka: str):
    """The active relay frozen (SIGSTOP, shorter than wal_sender_timeout: it keeps the slot),
    a standby waiting on the same slot: due events stay where they are until the active one
    resumes."""
    box = scheduled_outbox
    with contextlib.ExitStack() as stack, RelayProcess(box.env) as active:
        wait_until(lambda: "streaming slot=" in active.log(), 30)
        standby = RelayProcess(box.env)
        stack.enter_context(standby)
        wait_until(lambda: "hot standby" in standby.log(), 60)
        assert active.proc is not None
        active.proc.send_signal(signal.SIGSTOP)
        try:
            ids = schedule(box.url, [("s-1", server_now(box.url))] * 20)
            frozen_until = time.monotonic() + 4  # 8 times the mover's interval
            while time.monotonic() < frozen_until:
                waiting = query(box.url, f"SELECT count(*) FROM {SCHEDULED}")[0][0]
                assert waiting == 20, "a relay that does not hold the slot moved events"
                time.sleep(0.1)
        finally:
            active.proc.send_signal(signal.SIGCONT)
        records = consume_all(kafka, [box.topic(AGGREGATE_TYPE)], expected=20, timeout=60)
        assert {event_id(r) for r in records} == set(ids)
        assert active.stop() == 0, active.log()
