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


def missing_tables(conn: Connection, settings: Settings) -> list[str]:
    """The control tables that do not exist (schema-qualified names)."""
    missing = []
    for name in (KEPT_TABLE, SKIPPED_TABLE):
        qualified = f"{settings.table_schema}.{name}"
        row = conn.execute(
            "SELECT to_regclass(%s)", (sql.Identifier(settings.table_schema, name).as_string(conn),)
        ).fetchone()
        if row is None or row[0] is None:
            missing.append(qualified)
    return missing


def record_kept(conn: Connection, settings: Settings, action: Keep) -> None:
    """Note that the outbox row of ``action.event_id`` must be kept (idempotent)."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (source_table, event_id, source_lsn, reason) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING"
        ).format(control_table(settings, KEPT_TABLE)),
        (action.table, action.event_id, action.source_lsn, action.reason[:2000]),
    )
