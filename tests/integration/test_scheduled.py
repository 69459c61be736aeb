"""Scheduled events against a real PostgreSQL: schedule_event / cancel_event (and their SQL
functions), and the mover that moves due rows into the outbox: on time, in order, each exactly
once through crashes and concurrent movers, bytes unchanged."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cdc_relay import recipes
from cdc_relay.core.mapping import ColumnMapping
from cdc_relay.core.schedule import ScheduledStats
from cdc_relay.outbox import NotInTransaction, add_event
from cdc_relay.runtime import scheduler
from cdc_relay.runtime.scheduler import ScheduledMover
from cdc_relay.scheduled import ScheduledTable, cancel_event, create_sql, schedule_event
from tests.integration.conftest import Outbox
from tests.integration.relay_process import RelayProcess, execute, query
from tests.kafka_helpers import consume_all
from tests.servers import PgClientMixin, wait_until

SCHEDULED = ("public", "outbox_scheduled")
OUTBOX = ("public", "outbox")


def _create_tables(url: str, *, unique_ids: bool = True, outbox: bool = True) -> None:
    """The scheduled table, and (``outbox``) the default outbox (sql/outbox.sql) plus ``n``, a
    serial filled in insertion order, so that a test can read the order in which the mover
    inserted. Without ``unique_ids`` the outbox has no primary key, so a doubled move would show
    as two rows instead of failing."""
    with psycopg.connect(url, autocommit=True) as conn:
        if outbox:
            text = recipes.read("outbox.sql")
            body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
            conn.execute(sql.SQL(body).format(table=sql.Identifier(*OUTBOX)))
            conn.execute("ALTER TABLE public.outbox ADD COLUMN n bigserial")
            if not unique_ids:
                conn.execute("ALTER TABLE public.outbox DROP CONSTRAINT outbox_pkey")
        conn.execute(create_sql())


@pytest.fixture
def tables(db: str) -> str:
    _create_tables(db)
    return db


@pytest.fixture
def tables_no_pk(db: str) -> str:
    _create_tables(db, unique_ids=False)
    return db


def _mover(url: str, **kwargs: Any) -> ScheduledMover:
    options: dict[str, Any] = {"interval": 1.0, "batch": 500, "stop": threading.Event()}
    options.update(kwargs)
    return ScheduledMover(url, SCHEDULED, OUTBOX, **options)


@contextmanager
def _running(mover: ScheduledMover) -> Iterator[ScheduledMover]:
    mover.start()
    try:
        yield mover
    finally:
        assert mover.close(timeout=30), "the mover did not stop"


def _server_now(url: str) -> datetime:
    return query(url, "SELECT clock_timestamp()")[0][0]


def _count(url: str, table: str) -> int:
    return query(url, f"SELECT count(*) FROM {table}")[0][0]


def _schedule_many(
    url: str, plan: list[tuple[str, datetime]], *, per_transaction: int = 250
) -> list[uuid.UUID]:
    """Schedule one event per (aggregate_id, deliver_at), in this order; returns their ids."""
    ids: list[uuid.UUID] = []
    with psycopg.connect(url) as conn:
        for start in range(0, len(plan), per_transaction):
            for aggregate_id, deliver_at in plan[start : start + per_transaction]:
                ids.append(
                    schedule_event(
                        conn,
                        aggregate_type="subscription",
                        aggregate_id=aggregate_id,
                        event_type="Expired",
                        payload={"i": len(ids)},
                        deliver_at=deliver_at,
                    )
                )
            conn.commit()
    return ids


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _assert_aggregate_order(url: str, rank: dict[uuid.UUID, int], aggregate: dict[uuid.UUID, str]):
    """Per aggregate, the outbox's insertion order is the scheduling plan's order."""
    rows = query(url, "SELECT id FROM outbox ORDER BY n")
    by_aggregate: dict[str, list[int]] = defaultdict(list)
    for (event_id,) in rows:
        by_aggregate[aggregate[event_id]].append(rank[event_id])
    for name, ranks in by_aggregate.items():
        assert ranks == sorted(ranks), f"aggregate {name} out of order: {ranks}"


# --------------------------------------------------------------------------- the helper


def test_schedule_event_writes_in_the_callers_transaction_and_a_rollback_leaves_nothing(
    tables: str,
):
    when = datetime.now(UTC) + timedelta(hours=1)
    with psycopg.connect(tables) as conn:
        kept = schedule_event(
            conn,
            aggregate_type="subscription",
            aggregate_id="s-1",
            event_type="Expired",
            payload={"plan": "pro"},
            headers={"trace": "t-1"},
            deliver_at=when,
        )
        conn.commit()
        dropped = schedule_event(
            conn,
            aggregate_type="subscription",
            aggregate_id="s-2",
            event_type="Expired",
            payload={},
            deliver_at=when,
        )
        conn.rollback()

        async def from_async() -> uuid.UUID:
            async with await psycopg.AsyncConnection.connect(tables) as aconn:
                event_id = await schedule_event(
                    aconn.cursor(),
                    aggregate_type="subscription",
                    aggregate_id="s-3",
                    event_type="Expired",
                    payload=[1, "two"],
                    deliver_at=when,
                    event_id=uuid.UUID(int=3),
                )
                await aconn.commit()
                return event_id

        assert asyncio.run(from_async()) == uuid.UUID(int=3)
    rows = query(
        tables,
        "SELECT id, aggregate_id, event_type, payload, headers, deliver_at "
        "FROM outbox_scheduled ORDER BY seq",
    )
    assert rows == [
        (kept, "s-1", "Expired", {"plan": "pro"}, {"trace": "t-1"}, when),
        (uuid.UUID(int=3), "s-3", "Expired", [1, "two"], None, when),
    ]
    assert dropped not in {row[0] for row in rows}


def test_a_naive_deliver_at_and_an_autocommit_connection_are_refused(tables: str):
    with psycopg.connect(tables) as conn, pytest.raises(ValueError, match="timezone-aware"):
        schedule_event(
            conn,
            aggregate_type="a",
            aggregate_id="1",
            event_type="E",
            payload={},
            deliver_at=datetime(2030, 1, 1, 12, 0),
        )
    with (
        psycopg.connect(tables, autocommit=True) as conn,
        pytest.raises(NotInTransaction, match=r"conn\.transaction"),
    ):
        schedule_event(
            conn,
            aggregate_type="a",
            aggregate_id="1",
            event_type="E",
            payload={},
            deliver_at=datetime.now(UTC),
        )
    assert _count(tables, "outbox_scheduled") == 0


def test_the_sql_functions_schedule_and_cancel(tables: str):
    with psycopg.connect(tables) as conn:
        first = conn.execute(
            "SELECT cdc_relay_schedule_event('subscription', 's-1', 'Expired', "
            '\'{"plan": "pro"}\', now() + interval \'1 day\', \'{"source": "sql"}\')'
        ).fetchone()
        second = conn.execute(
            "SELECT cdc_relay_schedule_event('subscription', 's-2', 'Expired', '{}', "
            "now() + interval '1 day', event_id => %s)",
            (uuid.UUID(int=2),),
        ).fetchone()
        conn.commit()
        assert first is not None and second == (uuid.UUID(int=2),)
        assert conn.execute(
            "SELECT cdc_relay_cancel_scheduled_event(%s)", (first[0],)
        ).fetchone() == (True,)
        assert conn.execute(
            "SELECT cdc_relay_cancel_scheduled_event(%s)", (first[0],)
        ).fetchone() == (False,)
        conn.commit()
    assert query(tables, "SELECT id FROM outbox_scheduled") == [(uuid.UUID(int=2),)]


# --------------------------------------------------------------------------- the mover


class _Watcher:
    """Reads the outbox every 10 ms from another connection and notes, by the server's clock,
    when each row was first visible: when a reader (the relay's walsender) could first have it,
    which includes the move's commit and at most one poll period more."""

    def __init__(self, url: str) -> None:
        self.seen: dict[uuid.UUID, datetime] = {}
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        last = 0
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT n, id, clock_timestamp() FROM outbox WHERE n > %s", (last,)
                ).fetchall()
                for n, event_id, at in rows:
                    self.seen.setdefault(event_id, at)
                    last = max(last, n)
                self._stop.wait(0.01)


def _figures(lateness: list[float]) -> str:
    return (
        f"p50 {_percentile(lateness, 50) * 1000:.1f} ms, "
        f"p99 {_percentile(lateness, 99) * 1000:.1f} ms, max {max(lateness) * 1000:.1f} ms "
        f"(min {min(lateness) * 1000:.1f} ms, mean {statistics.fmean(lateness) * 1000:.1f} ms)"
    )


def test_events_spread_over_20_seconds_move_none_early_and_each_within_2_seconds(tables: str):
    """1,000 events at random times over 20 s, for 50 aggregates: each reaches the outbox no
    earlier than its deliver_at and at most 2 s after it; per aggregate in deliver_at order.
    Measured twice: the outbox row's created_at (the move transaction's start, the Kafka
    timestamp), and when another connection first saw the row (after the move's commit)."""
    rng = random.Random(20261201)
    start = _server_now(tables) + timedelta(seconds=3)
    plan = [
        (f"sub-{rng.randrange(50)}", start + timedelta(seconds=rng.uniform(0, 20)))
        for _ in range(1000)
    ]
    ids = _schedule_many(tables, plan)
    due = {event_id: at for event_id, (_, at) in zip(ids, plan, strict=True)}
    aggregate = {event_id: agg for event_id, (agg, _) in zip(ids, plan, strict=True)}
    # The plan's rank per aggregate: by deliver_at, then scheduling order.
    order = sorted(range(len(ids)), key=lambda i: (plan[i][1], i))
    rank = {ids[i]: position for position, i in enumerate(order)}

    with _Watcher(tables) as watcher, _running(_mover(tables, interval=1.0, batch=500)) as mover:
        wait_until(
            lambda: len(watcher.seen) == 1000,
            timeout=60,
            message=lambda: f"{len(watcher.seen)} of 1000 moved",
        )
        moved_total = mover.stats.moved_total

    rows = query(tables, "SELECT id, aggregate_id, payload, created_at FROM outbox")
    assert moved_total == 1000
    assert {row[0] for row in rows} == set(ids)
    assert _count(tables, "outbox_scheduled") == 0
    stamped = [(created_at - due[event_id]).total_seconds() for event_id, *_, created_at in rows]
    visible = [(watcher.seen[event_id] - due[event_id]).total_seconds() for event_id in ids]
    print(
        f"\nscheduled lateness of {len(ids)} events (interval 1 s, batch 500):\n"
        f"  outbox created_at - deliver_at: {_figures(stamped)}\n"
        f"  first seen by a reader (10 ms polls) - deliver_at: {_figures(visible)}"
    )
    assert min(stamped) >= 0, "an event was moved before its deliver_at"
    assert min(visible) >= 0, "an event was visible before its deliver_at"
    assert max(stamped) <= 2.0
    assert max(visible) <= 2.0
    _assert_aggregate_order(tables, rank, aggregate)
    for event_id, aggregate_id, payload, _ in rows:
        assert aggregate_id == aggregate[event_id]
        assert payload == {"i": ids.index(event_id)}


def test_an_event_scheduled_during_the_movers_sleep_waits_at_most_the_interval(tables: str):
    """The mover sleeps until the earliest deliver_at it knows of, or the interval: an event
    committed meanwhile with an earlier (or past) deliver_at waits at most about the interval."""
    lateness = []
    with _Watcher(tables) as watcher, _running(_mover(tables, interval=1.0)):
        for i in range(10):
            # Due right away, committed at a random point of the mover's (empty table) sleep.
            time.sleep(random.Random(i).uniform(0.05, 0.5))  # spreads them, no sync needed
            [event_id] = _schedule_many(tables, [("late", _server_now(tables))])
            committed = _server_now(tables)
            wait_until(lambda event_id=event_id: event_id in watcher.seen, timeout=30)
            lateness.append((watcher.seen[event_id] - committed).total_seconds())
    print(f"\nscheduled during the sleep (interval 1 s), commit to visible: {_figures(lateness)}")
    assert max(lateness) <= 1.0 + 0.5


def test_a_cancelled_event_never_reaches_the_outbox(tables: str):
    now = _server_now(tables)
    with psycopg.connect(tables) as conn:
        cancelled, kept, last = (
            schedule_event(
                conn,
                aggregate_type="subscription",
                aggregate_id="s-1",
                event_type=kind,
                payload={},
                deliver_at=now + timedelta(seconds=seconds),
            )
            for kind, seconds in (("Expired", 1.0), ("Reminder", 1.5), ("Sentinel", 2.0))
        )
        conn.commit()
        assert cancel_event(conn, cancelled) is True
        conn.commit()
        assert cancel_event(conn, cancelled) is False  # not there any more
        conn.commit()
    with _running(_mover(tables, interval=0.2)):
        # The cancelled event was due first: had it survived, it would be in before these.
        wait_until(lambda: _count(tables, "outbox") == 2, timeout=30)
    assert query(tables, "SELECT id, event_type FROM outbox ORDER BY n") == [
        (kept, "Reminder"),
        (last, "Sentinel"),
    ]
    with psycopg.connect(tables, autocommit=True) as conn:
        assert cancel_event(conn, kept) is False  # already moved: it is being published

    async def cancel_async() -> bool:
        async with await psycopg.AsyncConnection.connect(tables, autocommit=True) as aconn:
            return await cancel_event(aconn, last)

    assert asyncio.run(cancel_async()) is False


def test_a_locked_row_holds_back_the_later_rows_of_its_aggregate_only(tables: str):
    """A row another transaction holds (here a cancel that will roll back) is skipped, never
    waited for; the later rows of its aggregate wait behind it, other aggregates move."""
    past = _server_now(tables) - timedelta(seconds=10)
    plan = [("a", past), ("a", past + timedelta(seconds=1)), ("b", past)]
    first_a, second_a, only_b = _schedule_many(tables, plan)
    mover = _mover(tables)
    with psycopg.connect(tables) as holder:
        assert cancel_event(holder, first_a) is True  # locked, uncommitted
        assert mover.move_due() == 1
        assert query(tables, "SELECT id FROM outbox ORDER BY n") == [(only_b,)]
        holder.rollback()  # the cancel is undone: first_a is scheduled again
    assert mover.move_due() == 2
    assert query(tables, "SELECT id FROM outbox ORDER BY n") == [
        (only_b,),
        (first_a,),
        (second_a,),
    ]
    assert mover.stats.moved_total == 3


def test_payload_bytes_and_headers_are_those_add_event_would_have_written(tables: str, db: str):
    """The moved row equals, column for column, the row add_event writes for the same event;
    with a text outbox (a custom mapping) the payload's bytes are kept exactly, whitespace,
    key order and all."""
    payload = b'{"b": 1, "a": [1, 2.50, "\xc3\xa9", {"z": null}], "a": "dup"}'
    headers = {"trace": "t-1", "n": 1, "nested": {"x": [True, None]}, "é": "ü"}
    past = _server_now(tables) - timedelta(seconds=1)
    with psycopg.connect(tables) as conn:
        scheduled = schedule_event(
            conn,
            aggregate_type="order",
            aggregate_id="o-1",
            event_type="Placed",
            payload=payload,
            headers=headers,
            deliver_at=past,
        )
        direct = add_event(
            conn,
            aggregate_type="order",
            aggregate_id="o-1",
            event_type="Placed",
            payload=payload,
            headers=headers,
        )
        conn.commit()
    assert _mover(tables).move_due() == 1
    columns = "aggregate_type, aggregate_id, event_type, payload::text, headers::text"
    moved = query(tables, f"SELECT {columns} FROM outbox WHERE id = %s", (scheduled,))
    written = query(tables, f"SELECT {columns} FROM outbox WHERE id = %s", (direct,))
    assert moved == written and len(moved) == 1

    # A text outbox (payload and headers as text) and a scheduled table that mirrors it.
    execute(db, "CREATE SCHEMA raw")
    execute(
        db,
        "CREATE TABLE raw.outbox (id uuid PRIMARY KEY, aggregate_type text NOT NULL, "
        "aggregate_id text NOT NULL, event_type text NOT NULL, payload text NOT NULL, "
        "headers text, created_at timestamptz NOT NULL DEFAULT now())",
    )
    raw = ScheduledTable("raw.scheduled")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(create_sql(raw, payload_type="text", headers_type="text"))
    with psycopg.connect(db) as conn:
        event_id = schedule_event(
            conn,
            aggregate_type="order",
            aggregate_id="o-2",
            event_type="Placed",
            payload=payload,
            headers=headers,
            deliver_at=past,
            table=raw,
        )
        conn.commit()
    mover = ScheduledMover(db, raw.qualified, ("raw", "outbox"), 1.0, 10, threading.Event())
    assert mover.move_due() == 1
    [(text, header_text)] = query(
        db, "SELECT payload, headers FROM raw.outbox WHERE id = %s", (event_id,)
    )
    assert text.encode() == payload
    assert json.loads(header_text) == headers


def test_an_outbox_without_headers_never_gets_a_row_that_has_them(db: str):
    """With CDC_RELAY_COLUMN_HEADERS empty the outbox cannot carry headers: a row that has them
    stays (overdue, holding back its aggregate) instead of losing them; the others move."""
    execute(
        db,
        "CREATE TABLE bare (id uuid PRIMARY KEY, aggregate_type text NOT NULL, "
        "aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now())",
    )
    _create_tables(db, outbox=False)
    past = _server_now(db) - timedelta(seconds=10)
    with psycopg.connect(db) as conn:
        with_headers, after_it, other = (
            schedule_event(
                conn,
                aggregate_type="order",
                aggregate_id=aggregate_id,
                event_type="E",
                payload={},
                headers=headers,
                deliver_at=past + timedelta(seconds=offset),
            )
            for aggregate_id, headers, offset in (
                ("a", {"x": 1}, 0),
                ("a", None, 1),
                ("b", None, 2),
            )
        )
        conn.commit()
    mover = ScheduledMover(
        db,
        SCHEDULED,
        ("public", "bare"),
        1.0,
        500,
        threading.Event(),
        columns=ColumnMapping(headers=None),
        overdue_after=5.0,
    )
    assert mover.move_due() == 1
    assert query(db, "SELECT id FROM bare") == [(other,)]
    stats = mover.sample()
    assert (stats.scheduled, stats.overdue) == (2, 2)
    assert {r[0] for r in query(db, "SELECT id FROM outbox_scheduled")} == {with_headers, after_it}


MOVER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, threading
    from cdc_relay.runtime.scheduler import ScheduledMover
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mover = ScheduledMover(
        sys.argv[1], ("public", "outbox_scheduled"), ("public", "outbox"),
        interval=float(sys.argv[2]), batch=int(sys.argv[3]), stop=stop,
    )
    print("ready", flush=True)
    mover.run()
    print("moved", mover.stats.moved_total, flush=True)
    """
)


class MoverProcess:
    """The mover in a subprocess (``ScheduledMover.run()``), stopped by its PID."""

    def __init__(self, url: str, *, interval: float, batch: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOVER_SCRIPT, url, str(interval), str(batch)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return out


def _slow_outbox_inserts(url: str, seconds_per_row: float) -> None:
    """A trigger that makes every outbox insert take ``seconds_per_row``: a move of a batch
    then lasts long enough for a SIGKILL to land inside it."""
    execute(
        url,
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds_per_row}); RETURN NEW; END $$",
    )
    execute(
        url,
        "CREATE TRIGGER slow BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION slow_insert()",
    )


def _mover_is_moving(url: str) -> bool:
    """Whether a mover's backend is executing a statement (an open move transaction)."""
    rows = query(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cdc-relay-scheduler' "
        "AND state = 'active' AND query LIKE '%%SKIP LOCKED%%'",
    )
    return rows[0][0] > 0


def test_sigkill_of_the_mover_while_events_fall_due_loses_and_doubles_nothing(
    tables_no_pk: str,
):
    """Movers killed with SIGKILL over and over, most of them in the middle of a move, while
    3,000 events fall due: afterwards each scheduled id is in the outbox exactly once (the outbox
    here has no primary key, so a double would show), in per-aggregate order."""
    url = tables_no_pk
    _slow_outbox_inserts(url, 0.002)  # a batch of 20 takes 40 ms or more
    rng = random.Random(7)
    start = _server_now(url) + timedelta(seconds=1)
    plan = [
        (f"sub-{rng.randrange(100)}", start + timedelta(seconds=rng.uniform(0, 4)))
        for _ in range(3000)
    ]
    ids = _schedule_many(url, plan, per_transaction=1000)
    aggregate = {event_id: agg for event_id, (agg, _) in zip(ids, plan, strict=True)}
    order = sorted(range(len(ids)), key=lambda i: (plan[i][1], i))
    rank = {ids[i]: position for position, i in enumerate(order)}

    kills = mid_move = 0
    counts: list[int] = []
    mover: MoverProcess | None = None
    try:
        # Kill after a random 0.1-0.6 s (the timing of the crash, not a synchronisation), as
        # long as rows remain and at most 25 times; whether the move was running is sampled
        # just before the kill.
        while kills < 25 and _count(url, "outbox_scheduled") > 0:
            mover = MoverProcess(url, interval=0.05, batch=20)
            time.sleep(rng.uniform(0.1, 0.6))
            mid_move += _mover_is_moving(url)
            mover.kill()
            mover = None
            kills += 1
            counts.append(_count(url, "outbox"))
        mover = MoverProcess(url, interval=0.05, batch=20)
        wait_until(
            lambda: _count(url, "outbox_scheduled") == 0,
            timeout=120,
            message=lambda: f"{_count(url, 'outbox_scheduled')} rows still scheduled",
        )
        mover.stop()
        mover = None
    finally:
        if mover is not None:
            mover.kill()
    print(
        f"\n{kills} SIGKILLs ({mid_move} during a move) while 3000 events fell due; "
        f"outbox rows after each: {counts}"
    )
    doubled = query(url, "SELECT id, count(*) FROM outbox GROUP BY id HAVING count(*) > 1")
    assert doubled == [], f"doubled: {doubled[:5]}"
    assert sorted(r[0] for r in query(url, "SELECT id FROM outbox")) == sorted(ids)
    assert kills >= 10 and mid_move >= 3
    _assert_aggregate_order(url, rank, aggregate)


def test_two_movers_at_once_never_double_a_row_and_keep_each_aggregates_order(
    tables_no_pk: str,
):
    url = tables_no_pk
    rng = random.Random(2)
    past = _server_now(url) - timedelta(seconds=60)
    plan = [
        (f"sub-{rng.randrange(200)}", past + timedelta(milliseconds=rng.randrange(50_000)))
        for _ in range(4000)
    ]
    ids = _schedule_many(url, plan, per_transaction=4000)
    aggregate = {event_id: agg for event_id, (agg, _) in zip(ids, plan, strict=True)}
    order = sorted(range(len(ids)), key=lambda i: (plan[i][1], i))
    rank = {ids[i]: position for position, i in enumerate(order)}
    first, second = _mover(url, batch=25, interval=0.05), _mover(url, batch=25, interval=0.05)
    with _running(first), _running(second):
        wait_until(lambda: _count(url, "outbox_scheduled") == 0, timeout=90)
    print(f"\ntwo movers moved {first.stats.moved_total} and {second.stats.moved_total}")
    assert first.stats.moved_total + second.stats.moved_total == 4000
    assert first.stats.moved_total > 0 and second.stats.moved_total > 0
    assert query(url, "SELECT count(*), count(DISTINCT id) FROM outbox") == [(4000, 4000)]
    assert {r[0] for r in query(url, "SELECT id FROM outbox")} == set(ids)
    _assert_aggregate_order(url, rank, aggregate)


def test_stats_count_what_waits_and_what_is_overdue(tables: str):
    with psycopg.connect(tables, autocommit=True) as conn:
        assert scheduler.report(conn, ("public", "nothing_here"), overdue_after=5.0) is None
    now = _server_now(tables)
    plan = [("a", now - timedelta(seconds=30)), ("b", now - timedelta(seconds=1))]
    plan += [("c", now + timedelta(hours=1))] * 3
    _schedule_many(tables, plan)
    with psycopg.connect(tables, autocommit=True) as conn:
        status = scheduler.report(conn, SCHEDULED, overdue_after=5.0)
    assert status is not None
    assert status["table"] == "public.outbox_scheduled"
    assert (status["scheduled"], status["due"], status["overdue"]) == (5, 2, 1)
    # The relay keeps one ScheduledStats across sessions: counters carry on.
    kept = ScheduledStats(moved_total=7)
    mover = _mover(tables, overdue_after=5.0, stats=kept)
    stats = mover.sample()
    assert (stats.scheduled, stats.due, stats.overdue) == (5, 2, 1)
    assert 30 <= stats.oldest_due_age_seconds < 60
    assert mover.move_due() == 2
    stats = mover.sample()
    assert (stats.scheduled, stats.due, stats.overdue, stats.oldest_due_age_seconds) == (
        3,
        0,
        0,
        0.0,
    )
    assert stats is kept and stats.moved_total == 7 + 2
    next_due = mover.next_due_in()
    assert next_due is not None and 3500 < next_due <= 3600


def test_a_lost_connection_is_counted_and_the_mover_carries_on(tables: str):
    now = _server_now(tables)
    mover = _mover(tables, interval=0.1)
    with _running(mover):
        _schedule_many(tables, [("a", now - timedelta(seconds=1))])
        wait_until(lambda: _count(tables, "outbox") == 1, timeout=30)
        execute(
            tables,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'cdc-relay-scheduler'",
        )
        _schedule_many(tables, [("a", _server_now(tables))])
        wait_until(lambda: _count(tables, "outbox") == 2, timeout=30)
    assert mover.stats.errors_total >= 1
    assert mover.stats.last_error is not None


def test_a_relay_of_one_hash_partition_moves_into_the_root(db: str):
    """With a hash-partitioned outbox each relay streams one partition; its mover inserts into
    the partitioned root, so every moved row lands in its aggregate's partition."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SET cdc_relay.partitions = 2")
        conn.execute(recipes.read("outbox_hash.sql"))
    _create_tables(db, outbox=False)
    past = _server_now(db) - timedelta(seconds=1)
    ids = _schedule_many(db, [(f"o-{i}", past) for i in range(40)])
    mover = ScheduledMover(db, SCHEDULED, ("public", "outbox_p0"), 1.0, 500, threading.Event())
    assert mover.move_due() == 40
    assert {r[0] for r in query(db, "SELECT id FROM outbox")} == set(ids)
    per_partition = dict(
        query(db, "SELECT tableoid::regclass::text, count(*) FROM outbox GROUP BY 1")
    )
    assert set(per_partition) == {"outbox_p0", "outbox_p1"}


def test_the_privileges_a_mover_and_a_service_need(tables: str, pg: PgClientMixin):
    """What the relay's run role must be granted for the mover: SELECT, UPDATE (for FOR UPDATE)
    and DELETE on the scheduled table, INSERT on the outbox; nothing else. A service: INSERT to
    schedule (no sequence privilege for the identity column), SELECT and DELETE to cancel."""
    role, service = f"mover_{uuid.uuid4().hex[:8]}", f"service_{uuid.uuid4().hex[:8]}"
    dbname = str(conninfo_to_dict(tables)["dbname"])
    execute(tables, "ALTER TABLE outbox DROP COLUMN n")  # the default outbox, as it ships
    execute(tables, f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    execute(tables, f"CREATE ROLE {service} LOGIN PASSWORD 'pw'")
    try:
        execute(tables, f"GRANT USAGE ON SCHEMA public TO {role}, {service}")
        execute(tables, f"GRANT INSERT ON outbox_scheduled TO {service}")
        service_url = pg.url(user=service, password="pw", dbname=dbname)
        _schedule_many(service_url, [("a", _server_now(tables) - timedelta(seconds=1))])
        [cancelled] = _schedule_many(service_url, [("b", _server_now(tables))])
        with psycopg.connect(service_url) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cancel_event(conn, cancelled)
            conn.rollback()
            execute(tables, f"GRANT SELECT, DELETE ON outbox_scheduled TO {service}")
            assert cancel_event(conn, cancelled) is True
            conn.commit()
        execute(tables, f"GRANT SELECT, DELETE ON outbox_scheduled TO {role}")
        execute(tables, f"GRANT INSERT ON outbox TO {role}")
        mover = _mover(pg.url(user=role, password="pw", dbname=dbname))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="outbox_scheduled"):
            mover.move_due()  # FOR UPDATE needs UPDATE
        execute(tables, f"GRANT UPDATE ON outbox_scheduled TO {role}")
        mover = _mover(pg.url(user=role, password="pw", dbname=dbname))
        assert mover.move_due() == 1
        assert mover.sample().scheduled == 0
        assert mover.next_due_in() is None
    finally:
        for name in (role, service):
            execute(tables, f"DROP OWNED BY {name}")
            execute(tables, f"DROP ROLE {name}")


# --------------------------------------------------------------------------- end to end


def test_moved_events_are_published_by_the_relay_in_scheduled_order(outbox: Outbox, kafka: str):
    """The WAL path is the only path: the relay publishes the moved rows as any outbox event,
    same id, key, payload and headers, in deliver_at then scheduling order per key."""
    _create_tables(outbox.url, outbox=False)
    now = _server_now(outbox.url)
    # Scheduled in one order, due in another; two with the same deliver_at keep theirs.
    plan = [
        ("o-1", now + timedelta(seconds=2)),
        ("o-1", now + timedelta(seconds=1)),
        ("o-1", now + timedelta(seconds=2)),
        ("o-2", now + timedelta(seconds=1.5)),
    ]
    with RelayProcess(outbox.env) as relay:
        ids = _schedule_many(outbox.url, plan)
        with _running(_mover(outbox.url, interval=0.2)):
            records = consume_all(kafka, [outbox.topic("subscription")], expected=4, timeout=60)
        assert relay.stop() == 0
    published = [((r.header("id") or b"").decode(), r.key) for r in records]
    by_key = {key: [event_id for event_id, k in published if k == key] for key in (b"o-1", b"o-2")}
    assert by_key == {b"o-1": [str(ids[1]), str(ids[0]), str(ids[2])], b"o-2": [str(ids[3])]}
    for record in records:
        event_id = uuid.UUID((record.header("id") or b"").decode())
        assert json.loads(record.value or b"") == {"i": ids.index(event_id)}
