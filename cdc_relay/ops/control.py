"""The relay's control tables (cdc_relay/sql/control.sql): which outbox rows prune must keep,
and which events an operator skipped. Created by `setup`, beside the outbox."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdc_relay import recipes
from cdc_relay.core.pipeline import Keep
from cdc_relay.settings import Settings

Connection = psycopg.Connection[tuple[Any, ...]]

KEPT_TABLE = "cdc_relay_kept"
SKIPPED_TABLE = "cdc_relay_skipped"


def control_table(settings: Settings, name: str) -> sql.Identifier:
    return sql.Identifier(settings.control_schema, name)


def create_sql(settings: Settings) -> sql.Composed:
    return recipes.composed("control.sql", schema=sql.Identifier(settings.control_schema))


EMIT_FUNCTIONS = (
    "cdc_relay_emit_event(text,text,text,jsonb,jsonb)",
    "cdc_relay_emit_event_bytes(text,text,text,bytea,jsonb)",  # the one with the prefix
)


def emit_sql(settings: Settings) -> sql.Composed:
    """The SQL functions that write events as logical decoding messages, for the configured
    prefix (cdc_relay/sql/emit_event.sql)."""
    return recipes.composed(
        "emit_event.sql",
        schema=sql.Identifier(settings.control_schema),
        prefix=sql.Literal(settings.message_prefix),
    )


def emit_function_state(conn: Connection, settings: Settings) -> str:
    """``missing``, ``current`` (emits with the configured prefix) or ``other prefix``."""
    schema = sql.Identifier(settings.control_schema).as_string(conn)
    sources = []
    for function in EMIT_FUNCTIONS:
        row = conn.execute(
            "SELECT p.prosrc FROM pg_proc p WHERE p.oid = to_regprocedure(%s)",
            (f"{schema}.{function}",),
        ).fetchone()
        if row is None:
            return "missing"
        sources.append(str(row[0]))
    # cdc_relay_emit_event calls cdc_relay_emit_event_bytes, which holds the prefix.
    prefix = sql.Literal(settings.message_prefix).as_string(conn)
    return "current" if f"prefix constant text := {prefix};" in sources[1] else "other prefix"


KEEP_FUNCTION = "cdc_relay_keep"


def missing_tables(conn: Connection, settings: Settings) -> list[str]:
    """The control tables (and the keep function) that do not exist, schema-qualified."""
    schema = settings.control_schema
    missing = []
    for name in (KEPT_TABLE, SKIPPED_TABLE):
        row = conn.execute(
            "SELECT to_regclass(%s)", (sql.Identifier(schema, name).as_string(conn),)
        ).fetchone()
        if row is None or row[0] is None:
            missing.append(f"{schema}.{name}")
    signature = f"{sql.Identifier(schema, KEEP_FUNCTION).as_string(conn)}(text,text,pg_lsn,text)"
    row = conn.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone()
    if row is None or row[0] is None:
        missing.append(f"{schema}.{KEEP_FUNCTION}()")
    return missing


def record_kept(conn: Connection, settings: Settings, action: Keep) -> None:
    """Note that the outbox row of ``action.event_id`` must be kept (idempotent), through the
    SECURITY DEFINER function, so that the run role needs no privilege on the table."""
    conn.execute(
        sql.SQL("SELECT {}(%s, %s, %s, %s)").format(
            sql.Identifier(settings.control_schema, KEEP_FUNCTION)
        ),
        (action.table, action.event_id, action.source_lsn, action.reason[:2000]),
    )
