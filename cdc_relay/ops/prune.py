"""`cdc-relay prune`: delete outbox rows the relay has confirmed, in small batches.

The publication carries inserts only, so deleting outbox rows never emits anything; the only
question is which rows are safe to delete. A row is safe once the relay has confirmed (after
Kafka's acks) the commit of the transaction that inserted it. ``created_at`` cannot tell: it is
the inserting transaction's *start* time, and a long transaction commits, and is decoded, after
rows with later timestamps. Prune therefore decides by commit order:

1. In one statement it takes a snapshot and then reads the WAL insert position ``L0``. Every
   transaction whose id is below the snapshot's ``xmin`` had finished before the snapshot, so
   its commit record lies before ``L0``. (The snapshot's xmin, not its in-progress list: that
   list names top-level transactions only, and a row inserted under a savepoint carries a
   subtransaction id.)
2. It waits, at most ``--wait``, until the slot's ``confirmed_flush_lsn`` reaches ``L0``. The
   relay confirms a position only when every event committed before it has been acknowledged,
   so from then on every such transaction's events are in Kafka. If the slot does not get there
   (the relay is stopped or behind), prune deletes nothing and says so.
3. It deletes, in batches of ``--batch-size`` rows, each batch its own short transaction, the
   rows whose inserting transaction id is below that xmin and whose ``created_at`` is older
   than ``--older-than`` (an age margin on top, for consumers that re-read the table).

A row's ``xmin`` is a 32-bit transaction id; it is widened to the 64-bit ``xid8`` against the
current transaction counter (every unfrozen id lies within 2^31 of it). A frozen row older than
2^32 transactions may be widened into the wrong epoch: it then merely looks recent and is kept.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn
from cdc_relay.errors import ConfigError, PrerequisiteError, PruneBlocked
from cdc_relay.ops import admin, control
from cdc_relay.ops.admin import Connection, Say
from cdc_relay.settings import Settings

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_POLL_SECONDS = 0.25


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → timedelta; anything else → ValueError."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: write a whole number and a unit, e.g. 90s, 30m, 12h, 7d"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


_NEXT_XID = sql.SQL("pg_snapshot_xmax(pg_current_snapshot())::text::bigint")


def xid8_of(xid: sql.Composable, next_xid: sql.Composable = _NEXT_XID) -> sql.Composed:
    """SQL widening a 32-bit transaction id (a row's xmin) to xid8 (as bigint), against the next
    transaction id of the statement's snapshot: an id above that counter's low 32 bits belongs
    to the previous epoch."""
    return sql.SQL(
        "((GREATEST(((({next})::bigint >> 32) - (({xid})::text::bigint > (({next})::bigint"
        " & 4294967295))::int), 0) << 32) | ({xid})::text::bigint)"
    ).format(next=next_xid, xid=xid)


def _condition(alias: str, settings: Settings, with_age: bool) -> sql.Composed:
    xmin = sql.SQL("{}.xmin").format(sql.Identifier(alias))
    parts: list[sql.Composable] = [
        sql.SQL("{} < %(horizon)s").format(xid8_of(xmin)),
        # Rows whose payload never reached Kafka (dead-lettered without it) are the only
        # copy of their event: never deleted here (cdc_relay/sql/control.sql).
        sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {kept} k WHERE k.source_table = %(table)s "
            "AND k.event_id = {alias}.{id}::text)"
        ).format(
            kept=control.control_table(settings, control.KEPT_TABLE),
            alias=sql.Identifier(alias),
            id=sql.Identifier(settings.column_id),
        ),
    ]
    if with_age:
        parts.append(
            sql.SQL("{}.{} < %(cutoff)s").format(
                sql.Identifier(alias), sql.Identifier(settings.column_created_at)
            )
        )
    return sql.SQL(" AND ").join(parts)


def delete_batch_sql(settings: Settings, *, with_age: bool) -> sql.Composed:
    """One batch: pick at most %(batch)s ids, then delete them (rechecking the condition)."""
    table = sql.Identifier(settings.table_schema, settings.table_name)
    column_id = sql.Identifier(settings.column_id)
    return sql.SQL(
        "DELETE FROM {table} AS o WHERE o.{id} = ANY (ARRAY("
        "SELECT c.{id} FROM {table} AS c WHERE {picked} LIMIT %(batch)s)) AND {still}"
    ).format(
        table=table,
        id=column_id,
        picked=_condition("c", settings, with_age),
        still=_condition("o", settings, with_age),
    )


def count_sql(settings: Settings, *, with_age: bool) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {} AS c WHERE {}").format(
        sql.Identifier(settings.table_schema, settings.table_name),
        _condition("c", settings, with_age),
    )


@dataclass(frozen=True, slots=True)
class PruneResult:
    deleted: int
    batches: int
    horizon_lsn: Lsn


def prune(
    conn: Connection,
    settings: Settings,
    *,
    older_than: timedelta,
    batch_size: int,
    wait_seconds: float,
    dry_run: bool,
    say: Say,
) -> PruneResult:
    """Delete confirmed outbox rows older than ``older_than``; ``conn`` must be autocommit, so
    that every batch commits on its own (short transactions, short row locks)."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    columns = admin.table_columns(conn, settings)
    if columns is None:
        raise PrerequisiteError(f"table {settings.outbox_table} does not exist")
    missing = control.missing_tables(conn, settings)
    if missing:
        raise PrerequisiteError(
            f"{missing[0]} does not exist: run `cdc-relay setup` first (prune must know "
            "which rows are the only copy of their event)"
        )
    admin.require_prunable(conn, settings)
    with_age = bool(settings.column_created_at) and settings.column_created_at in columns
    if not with_age and older_than > timedelta(0):
        raise ConfigError(
            f"table {settings.outbox_table} has no created_at column "
            "(CDC_RELAY_COLUMN_CREATED_AT): only --older-than 0s is possible"
        )

    row = conn.execute(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
        "pg_current_wal_insert_lsn()::text, now() - %s::interval",
        (older_than,),
    ).fetchone()
    assert row is not None
    horizon_xid, start_lsn_text, cutoff = row
    start_lsn = parse_lsn(start_lsn_text)

    confirmed = _wait_confirmed(conn, settings, start_lsn, wait_seconds)
    if confirmed is None or confirmed < start_lsn:
        shown = format_lsn(confirmed) if confirmed is not None else "nothing"
        raise PruneBlocked(
            f"nothing deleted: slot {settings.slot_name} has confirmed {shown}, not yet "
            f"{format_lsn(start_lsn)} where prune started (is `cdc-relay run` running and caught "
            "up? see `cdc-relay status`)"
        )

    params = {
        "horizon": horizon_xid,
        "cutoff": cutoff,
        "batch": batch_size,
        "table": settings.qualified_table,
    }
    if dry_run:
        count_row = conn.execute(count_sql(settings, with_age=with_age), params).fetchone()
        would = int(count_row[0]) if count_row else 0
        say(f"dry run: would delete {would} confirmed rows created before {_when(cutoff)}")
        return PruneResult(deleted=0, batches=0, horizon_lsn=start_lsn)

    query = delete_batch_sql(settings, with_age=with_age)
    deleted = batches = 0
    while True:
        count = conn.execute(query, params).rowcount
        batches += 1
        deleted += max(count, 0)
        if count < batch_size:
            break
    say(
        f"deleted {deleted} confirmed rows created before {_when(cutoff)} "
        f"in {batches} batches of at most {batch_size}"
    )
    return PruneResult(deleted=deleted, batches=batches, horizon_lsn=start_lsn)


def _wait_confirmed(
    conn: Connection, settings: Settings, target: Lsn, wait_seconds: float
) -> Lsn | None:
    deadline = time.monotonic() + wait_seconds
    while True:
        confirmed = admin.require_slot(conn, settings).confirmed
        if (confirmed is not None and confirmed >= target) or time.monotonic() >= deadline:
            return confirmed
        time.sleep(_POLL_SECONDS)


def _when(moment: datetime) -> str:
    return moment.isoformat(sep=" ", timespec="seconds")
