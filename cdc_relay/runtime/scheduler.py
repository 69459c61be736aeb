"""The scheduled-events mover: moves the scheduled rows that fell due into the outbox.

The relay runs one while it holds its replication slot (a hot standby moves nothing). Each pass
is one statement, hence one transaction: a data-modifying CTE deletes at most ``batch`` due rows
(``FOR UPDATE SKIP LOCKED``) and inserts what it deleted into the outbox. A crash anywhere
either commits both or neither, so no row is lost or doubled; two movers at once (a takeover
that overlaps, or one relay per hash partition) skip each other's rows. The relay then
publishes the outbox INSERTs from the WAL: delivery, order and exactly-once into Kafka are those
of any other outbox event.

Order: rows move in (deliver_at, seq) order, seq being the scheduling order, and a row never
moves before an earlier row of its aggregate (one held by another transaction's lock holds back
the later rows of its aggregate, not the others). So per aggregate, the outbox order, hence the
Kafka order, is deliver_at then scheduling order.

The moved row's created_at is the outbox column's default, the move transaction's start: when
the event entered the outbox (the Kafka timestamp), never before its deliver_at. deliver_at
itself is not carried over (docs/scheduled.md says why).

The decisions (how long to sleep, how to back off) are cdc_relay.core.schedule's; this module
only talks to the database.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay.adapters.database import describe_psycopg_error, with_tcp_keepalives
from cdc_relay.core.mapping import ColumnMapping
from cdc_relay.core.schedule import ScheduledStats, count_held, next_wait, retry_wait

log = logging.getLogger(__name__)

APPLICATION_NAME: Final = "cdc-relay-scheduler"
_CONNECT_TIMEOUT: Final = 10
# No pass may hang: SKIP LOCKED never waits for a row lock, and these bound anything else (an
# index entry of a concurrent insert of the same id, a lock on the outbox table).
_SESSION_SETTINGS: Final = ("SET statement_timeout = '30s'", "SET lock_timeout = '10s'")
DEFAULT_COLUMNS: Final = ColumnMapping()


def move_sql(
    scheduled_table: tuple[str, str],
    outbox_table: tuple[str, str],
    columns: ColumnMapping = DEFAULT_COLUMNS,
) -> sql.Composed:
    """The move: one statement, parameter ``batch``; its row count is the rows moved."""
    scheduled = sql.Identifier(*scheduled_table)
    targets = [
        columns.id,
        columns.aggregate_type,
        columns.aggregate_id,
        columns.event_type,
        columns.payload,
    ]
    sources = ["id", "aggregate_type", "aggregate_id", "event_type", "payload"]
    if columns.headers is not None:
        targets.append(columns.headers)
        sources.append("headers")
        movable = sql.SQL("true")
    else:
        # An outbox without a headers column cannot carry them: such rows stay (held, and
        # overdue in the stats) rather than lose their headers.
        movable = sql.SQL("headers IS NULL")
    # visible: the first `batch` due rows in order, as this statement's snapshot sees them (no
    # lock). locked: those of them this pass could lock; the others are held by another
    # transaction (a mover's move, a service's cancel) or cannot move. A locked row moves unless
    # an earlier row of its aggregate is among the others: per aggregate, nothing overtakes.
    # Every committed row earlier than a visible one is visible too (a prefix), so no earlier
    # row can hide outside the set; only a row whose transaction commits after the snapshot can,
    # and that is a row scheduled after this pass began.
    return sql.SQL(
        """
        WITH visible AS MATERIALIZED (
            SELECT id, aggregate_type, aggregate_id, deliver_at, seq, {movable} AS movable
            FROM {scheduled}
            WHERE deliver_at <= now()
            ORDER BY deliver_at, seq
            LIMIT %(batch)s
        ), locked AS MATERIALIZED (
            SELECT s.id FROM {scheduled} s
            WHERE s.id IN (SELECT id FROM visible WHERE movable)
            FOR UPDATE SKIP LOCKED
        ), others AS (
            SELECT v.aggregate_type, v.aggregate_id, v.deliver_at, v.seq FROM visible v
            WHERE v.id NOT IN (SELECT id FROM locked)
        ), ready AS (
            SELECT v.id FROM visible v JOIN locked l ON l.id = v.id
            WHERE NOT EXISTS (
                SELECT 1 FROM others o
                WHERE o.aggregate_type = v.aggregate_type
                  AND o.aggregate_id = v.aggregate_id
                  AND (o.deliver_at, o.seq) < (v.deliver_at, v.seq)
            )
        ), moved AS (
            DELETE FROM {scheduled} s USING ready r WHERE s.id = r.id
            RETURNING s.*
        )
        INSERT INTO {outbox} ({targets})
        SELECT {sources} FROM moved ORDER BY deliver_at, seq
        """
    ).format(
        scheduled=scheduled,
        movable=movable,
        outbox=sql.Identifier(*outbox_table),
        targets=sql.SQL(", ").join(sql.Identifier(name) for name in targets),
        sources=sql.SQL(", ").join(sql.Identifier(name) for name in sources),
    )


def outbox_root(conn: psycopg.Connection[Any], outbox_table: tuple[str, str]) -> tuple[str, str]:
    """The table to insert into: the outbox itself, or the root of the partitioned table it is a
    partition of. A relay of a hash-partitioned outbox streams one partition
    (CDC_RELAY_OUTBOX_TABLE=public.outbox_p3), but a moved row belongs to the partition of its
    aggregate: inserting into the root lets PostgreSQL route it. An outbox that does not exist
    is returned as given (the move then fails, and says so)."""
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = pg_partition_root(to_regclass(%s))",
        (sql.Identifier(*outbox_table).as_string(conn),),
    ).fetchone()
    return (row[0], row[1]) if row is not None else outbox_table


def next_due_sql(scheduled_table: tuple[str, str]) -> sql.Composed:
    """Seconds from now (the server's clock) to the earliest deliver_at; NULL when empty."""
    return sql.SQL(
        "SELECT extract(epoch FROM min(deliver_at) - clock_timestamp())::float8 FROM {}"
    ).format(sql.Identifier(*scheduled_table))


def stats_sql(scheduled_table: tuple[str, str]) -> sql.Composed:
    """scheduled, due, overdue (parameter ``overdue_after``, seconds), the oldest due row's age
    past its deliver_at (NULL when none is due). The due figures read only the due range of the
    (deliver_at, seq) index; the total counts the whole table (an index scan): sample it, do not
    poll it."""
    return sql.SQL(
        "SELECT (SELECT count(*) FROM {table}), count(*), "
        "count(*) FILTER (WHERE deliver_at < now() - make_interval(secs => %(overdue_after)s)), "
        "extract(epoch FROM now() - min(deliver_at))::float8 "
        "FROM {table} WHERE deliver_at <= now()"
    ).format(table=sql.Identifier(*scheduled_table))


def sample_stats(
    conn: psycopg.Connection[Any],
    scheduled_table: tuple[str, str],
    stats: ScheduledStats,
    *,
    overdue_after: float,
) -> ScheduledStats:
    """Fill ``stats`` with one sample of the scheduled table (also for `cdc-relay status`, over
    any connection) and return it."""
    row = conn.execute(stats_sql(scheduled_table), {"overdue_after": overdue_after}).fetchone()
    assert row is not None  # an aggregate always returns one row
    stats.sampled(
        scheduled=row[0],
        due=row[1],
        overdue=row[2],
        oldest_due_age_seconds=row[3],
        now_unix=time.time(),
    )
    return stats


def report(
    conn: psycopg.Connection[Any], scheduled_table: tuple[str, str], *, overdue_after: float
) -> dict[str, Any] | None:
    """For `cdc-relay status`: the scheduled table's counts, or None when it does not exist."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(*scheduled_table).as_string(conn),),
    ).fetchone()
    if not exists or not exists[0]:
        return None
    stats = sample_stats(conn, scheduled_table, ScheduledStats(), overdue_after=overdue_after)
    return {
        "table": ".".join(scheduled_table),
        "scheduled": stats.scheduled,
        "due": stats.due,
        "overdue": stats.overdue,
        "oldest_due_age_seconds": round(stats.oldest_due_age_seconds, 3),
    }


class ScheduledMover:
    """Moves due scheduled rows into the outbox until ``stop`` is set.

    ``run()`` is the loop for a thread (``start()`` makes one); ``move_due()`` is one pass.
    ``interval`` bounds every sleep, so also how late a row can be that was scheduled (or
    committed) less than that before its deliver_at; ``batch`` bounds one transaction.
    ``overdue_after``: how far past its deliver_at a row counts as overdue in the stats.
    ``stats_interval``: how often the loop samples the table's counts into ``stats``.
    """

    def __init__(
        self,
        conninfo: str,
        scheduled_table: tuple[str, str],
        outbox_table: tuple[str, str],
        interval: float,
        batch: int,
        stop: threading.Event,
        *,
        columns: ColumnMapping = DEFAULT_COLUMNS,
        overdue_after: float = 5.0,
        stats_interval: float = 5.0,
        stats: ScheduledStats | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._conninfo = conninfo
        self._scheduled_table = scheduled_table
        self._interval = interval
        self._batch = batch
        self._stop = stop
        self._overdue_after = overdue_after
        self._stats_interval = stats_interval
        self._outbox_table = outbox_table
        self._columns = columns
        self._move: sql.Composed | None = None  # once the outbox's root is known
        self._next_due = next_due_sql(scheduled_table)
        self._conn: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        # The relay passes one ScheduledStats for all its sessions, so that the counters of the
        # metrics never go down when a session's mover is replaced.
        self.stats = stats if stats is not None else ScheduledStats()

    # ---------------------------------------------------------------- one pass

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                with_tcp_keepalives(self._conninfo),
                autocommit=True,
                connect_timeout=_CONNECT_TIMEOUT,
                application_name=APPLICATION_NAME,
            )
            for statement in _SESSION_SETTINGS:
                conn.execute(statement)
            if self._move is None:
                target = outbox_root(conn, self._outbox_table)
                self._move = move_sql(self._scheduled_table, target, self._columns)
            self._conn = conn
        return self._conn

    def move_due(self) -> int:
        """One transaction: move at most ``batch`` due rows into the outbox; returns how many."""
        # Autocommit: the one statement is the transaction, so its delete and insert commit
        # together or not at all.
        conn = self._connection()
        assert self._move is not None  # built by _connection()
        cursor = conn.execute(self._move, {"batch": self._batch})
        moved = max(cursor.rowcount, 0)
        self.stats.moved_total += moved
        return moved

    def next_due_in(self) -> float | None:
        """Seconds to the earliest deliver_at (negative: past); None when nothing is scheduled."""
        row = self._connection().execute(self._next_due).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def sample(self) -> ScheduledStats:
        """Sample the scheduled table's counts into ``stats`` now."""
        return sample_stats(
            self._connection(),
            self._scheduled_table,
            self.stats,
            overdue_after=self._overdue_after,
        )

    # ---------------------------------------------------------------- the loop

    def run(self) -> None:
        """Passes until ``stop`` is set: move what is due, then sleep until the next deliver_at
        or ``interval``, whichever comes first. A failure (connection lost, statement refused)
        is logged once, counted, and retried with backoff; it never ends the loop."""
        held = 0
        failures = 0
        next_sample = 0.0
        try:
            while not self._stop.is_set():
                try:
                    moved = self.move_due()
                    if time.monotonic() >= next_sample:
                        self.sample()
                        next_sample = time.monotonic() + self._stats_interval
                    next_due_in = self.next_due_in()
                except psycopg.Error as exc:
                    failures += 1
                    self._failed(exc, failures)
                    wait = retry_wait(failures, self._interval)
                else:
                    if failures:
                        log.info("recovered: moving scheduled events again")
                        failures = 0
                    held = count_held(held, moved=moved, next_due_in=next_due_in)
                    wait = next_wait(
                        next_due_in=next_due_in,
                        interval=self._interval,
                        moved=moved,
                        batch=self._batch,
                        held_passes=held,
                    )
                if wait > 0 and self._stop.wait(wait):
                    break
        finally:
            self._close()

    def _failed(self, exc: psycopg.Error, failures: int) -> None:
        described = describe_psycopg_error(exc)
        self.stats.errors_total += 1
        self.stats.last_error = described
        if failures == 1:
            log.warning(
                "cannot move scheduled events from %s: %s (retrying with backoff up to %g s)",
                ".".join(self._scheduled_table),
                described,
                retry_wait(1_000, self._interval),
            )
        # A broken or aborted connection is replaced on the next pass.
        self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ---------------------------------------------------------------- as a thread

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread (cdc-relay-scheduler); stop it with ``close()``."""
        if self._thread is not None:
            raise RuntimeError("the mover was started already")
        self._thread = threading.Thread(target=self.run, name=APPLICATION_NAME, daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float = 10.0) -> bool:
        """Set ``stop`` and wait for the thread (a pass in progress commits or rolls back as a
        whole); returns whether it ended within ``timeout``."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
