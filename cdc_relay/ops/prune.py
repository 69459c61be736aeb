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

Claim-check (docs/claim-check.md): with ``claim_check_over_bytes`` set, a row whose payload is
larger than that (as the relay measures it: the bytes it would publish) was published as a
reference, and consumers fetch its payload from the table; such a row is also kept until its
``created_at`` is older than ``claim_check_retention``. This only takes rows out of what steps
1-3 would delete, so the commit-order argument above holds unchanged: every row deleted is
still one whose transaction the slot had confirmed.

A row's ``xmin`` is a 32-bit transaction id; it is widened to the 64-bit ``xid8`` against the
current transaction counter (every unfrozen id lies within 2^31 of it). A frozen row older than
2^32 transactions may be widened into the wrong epoch: it then merely looks recent and is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg import sql

from cdc_relay.claimcheck import PAYLOAD_TYPE_SQL
from cdc_relay.core.claimcheck import PayloadForm, payload_form
from cdc_relay.core.durations import parse_duration as parse_duration
from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn
from cdc_relay.errors import ConfigError, PrerequisiteError, PruneBlocked
from cdc_relay.ops import admin, control
from cdc_relay.ops.admin import Connection, Say
from cdc_relay.settings import Settings

_POLL_SECONDS = 0.25
DEFAULT_CLAIM_CHECK_RETENTION = timedelta(days=7)


_NEXT_XID = sql.SQL("pg_snapshot_xmax(pg_current_snapshot())::text::bigint")


def xid8_of(xid: sql.Composable, next_xid: sql.Composable = _NEXT_XID) -> sql.Composed:
    """SQL widening a 32-bit transaction id (a row's xmin) to xid8 (as bigint), against the next
    transaction id of the statement's snapshot: an id above that counter's low 32 bits belongs
    to the previous epoch."""
    return sql.SQL(
        "((GREATEST(((({next})::bigint >> 32) - (({xid})::text::bigint > (({next})::bigint"
        " & 4294967295))::int), 0) << 32) | ({xid})::text::bigint)"
    ).format(next=next_xid, xid=xid)


@dataclass(frozen=True, slots=True)
class ClaimCheckRule:
    """How prune measures a payload as the relay does: the column's PayloadForm (None: a type
    claim-check does not support, whose rows are then all kept for the retention, as if
    claim-checked), and whether the server encoding is UTF-8 (the relay reads text in
    UTF-8)."""

    form: PayloadForm | None
    utf8_server: bool = True

    @classmethod
    def of(cls, conn: Connection, schema: str, table: str, column: str) -> ClaimCheckRule:
        """The rule for the payload column ``column`` of ``schema.table``."""
        qualified = sql.Identifier(schema, table).as_string(conn)
        row = conn.execute(PAYLOAD_TYPE_SQL, (qualified, column)).fetchone()
        if row is None:
            raise PrerequisiteError(f"table {schema}.{table} has no column {column!r}")
        encoding = conn.execute("SELECT current_setting('server_encoding')").fetchone()
        return cls(
            form=payload_form(row[0], row[1]),
            utf8_server=encoding is not None and encoding[0] == "UTF8",
        )

    def size_sql(self, alias: str, column: str) -> sql.Composed | None:
        """SQL for the size in bytes of the value the relay publishes for the row's payload
        (None when unknown): a bytea's raw bytes, a bytea domain's hex text, any other type's
        text output in UTF-8. For bytea, text and json this reads only the stored length, not
        the value; jsonb's text is computed."""
        payload = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
        if self.form is None:
            return None
        if self.form == "raw":
            return sql.SQL("octet_length({})").format(payload)
        if self.form == "hex":
            return sql.SQL("(2 + 2 * octet_length({}::bytea))").format(payload)
        if self.utf8_server:
            return sql.SQL("octet_length({}::text)").format(payload)
        return sql.SQL("octet_length(convert_to({}::text, 'UTF8'))").format(payload)


def _condition(
    alias: str, settings: Settings, with_age: bool, claim_check: ClaimCheckRule | None = None
) -> sql.Composed:
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
    if claim_check is not None:
        # CASE, not OR: the payload is measured only for rows younger than the retention, so
        # prune does not read the payloads of rows it may delete by age anyway. A NULL payload
        # is published as a tombstone, never by reference.
        size = claim_check.size_sql(alias, settings.column_payload)
        small = (
            sql.SQL("false")
            if size is None
            else sql.SQL("coalesce({} <= %(claim_check_over)s, true)").format(size)
        )
        parts.append(
            sql.SQL(
                "CASE WHEN {alias}.{created_at} < %(claim_check_cutoff)s THEN true ELSE {small} END"
            ).format(
                alias=sql.Identifier(alias),
                created_at=sql.Identifier(settings.column_created_at),
                small=small,
            )
        )
    return sql.SQL(" AND ").join(parts)


def delete_batch_sql(
    settings: Settings, *, with_age: bool, claim_check: ClaimCheckRule | None = None
) -> sql.Composed:
    """One batch: pick at most %(batch)s ids, then delete them (rechecking the condition)."""
    table = sql.Identifier(settings.table_schema, settings.table_name)
    column_id = sql.Identifier(settings.column_id)
    return sql.SQL(
        "DELETE FROM {table} AS o WHERE o.{id} = ANY (ARRAY("
        "SELECT c.{id} FROM {table} AS c WHERE {picked} LIMIT %(batch)s)) AND {still}"
    ).format(
        table=table,
        id=column_id,
        picked=_condition("c", settings, with_age, claim_check),
        still=_condition("o", settings, with_age, claim_check),
    )


def count_sql(
    settings: Settings, *, with_age: bool, claim_check: ClaimCheckRule | None = None
) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {} AS c WHERE {}").format(
        sql.Identifier(settings.table_schema, settings.table_name),
        _condition("c", settings, with_age, claim_check),
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
    claim_check_over_bytes: int | None = None,
    claim_check_retention: timedelta = DEFAULT_CLAIM_CHECK_RETENTION,
) -> PruneResult:
    """Delete confirmed outbox rows older than ``older_than``; ``conn`` must be autocommit, so
    that every batch commits on its own (short transactions, short row locks).

    With ``claim_check_over_bytes`` (the relay's CDC_RELAY_CLAIM_CHECK_OVER_BYTES; None: off),
    rows whose payload is larger than that are also kept until they are older than
    ``claim_check_retention``: consumers fetch those payloads from the table."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if claim_check_over_bytes is not None and claim_check_over_bytes < 0:
        raise ConfigError("the claim-check threshold cannot be negative")
    if claim_check_retention < timedelta(0):
        raise ConfigError("the claim-check retention cannot be negative")
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
    claim_check: ClaimCheckRule | None = None
    if claim_check_over_bytes is not None:
        if not with_age:
            raise ConfigError(
                f"table {settings.outbox_table} has no created_at column "
                "(CDC_RELAY_COLUMN_CREATED_AT): prune cannot tell the age of claim-checked rows"
            )
        claim_check = ClaimCheckRule.of(
            conn, settings.table_schema, settings.table_name, settings.column_payload
        )

    row = conn.execute(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
        "pg_current_wal_insert_lsn()::text, now() - %s::interval, now() - %s::interval",
        (older_than, claim_check_retention),
    ).fetchone()
    assert row is not None
    horizon_xid, start_lsn_text, cutoff, claim_check_cutoff = row
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
        "claim_check_cutoff": claim_check_cutoff,
        "claim_check_over": claim_check_over_bytes,
    }
    kept = (
        ""
        if claim_check_over_bytes is None
        else f"; claim-checked rows (payload over {claim_check_over_bytes} bytes) created after "
        f"{_when(claim_check_cutoff)} kept"
    )
    if dry_run:
        count_query = count_sql(settings, with_age=with_age, claim_check=claim_check)
        count_row = conn.execute(count_query, params).fetchone()
        would = int(count_row[0]) if count_row else 0
        say(f"dry run: would delete {would} confirmed rows created before {_when(cutoff)}{kept}")
        return PruneResult(deleted=0, batches=0, horizon_lsn=start_lsn)

    query = delete_batch_sql(settings, with_age=with_age, claim_check=claim_check)
    deleted = batches = 0
    while True:
        count = conn.execute(query, params).rowcount
        batches += 1
        deleted += max(count, 0)
        if count < batch_size:
            break
    say(
        f"deleted {deleted} confirmed rows created before {_when(cutoff)} "
        f"in {batches} batches of at most {batch_size}{kept}"
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
