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
    return sql.Identifier(settings.table_schema, name)


def create_sql(settings: Settings) -> sql.Composed:
    text = recipes.read("control.sql")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return sql.SQL(body).format(schema=sql.Identifier(settings.table_schema))


KEEP_FUNCTION = "cdc_relay_keep"


def missing_tables(conn: Connection, settings: Settings) -> list[str]:
    """The control tables (and the keep function) that do not exist, schema-qualified."""
    schema = settings.table_schema
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
            sql.Identifier(settings.table_schema, KEEP_FUNCTION)
        ),
        (action.table, action.event_id, action.source_lsn, action.reason[:2000]),
    )
