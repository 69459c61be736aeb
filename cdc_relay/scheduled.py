"""The producer helper for scheduled events: write an event now, to be published at ``deliver_at``.

``schedule_event`` inserts one row into the scheduled table with the caller's connection and
never commits, exactly like ``cdc_relay.outbox.add_event``: the event exists when, and only
when, the caller's transaction commits together with its business rows. While the relay holds
its replication slot, its mover (cdc_relay.runtime.scheduler) moves each row that fell due into
the outbox, in one transaction, and the relay publishes it from the WAL like any other event.
``cancel_event`` deletes a row that has not been moved yet.

Both work with psycopg 3 sync and async connections (and cursors); with an async one they return
an awaitable. docs/scheduled.md has the design.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, overload

import psycopg
from psycopg import sql

from cdc_relay import recipes, tracing
from cdc_relay.core.names import split_table_name
from cdc_relay.core.schedule import require_aware
from cdc_relay.outbox import DEFAULT_SCHEDULED_TABLE as DEFAULT_SCHEDULED_TABLE_NAME
from cdc_relay.outbox import (
    AsyncTarget,
    Payload,
    SyncTarget,
    encode_payload,
    write_event,
)

# The outbox payload/headers column types a scheduled table can mirror (information_schema's
# data_type spelling, which is also valid SQL).
COLUMN_TYPES: Final = ("jsonb", "json", "text", "character varying", "bytea")

SCHEDULE_FUNCTION: Final = "cdc_relay_schedule_event"
CANCEL_FUNCTION: Final = "cdc_relay_cancel_scheduled_event"


@dataclass(frozen=True, slots=True)
class ScheduledTable:
    """Where scheduled events wait (its columns are fixed: sql/scheduled.sql)."""

    name: str = DEFAULT_SCHEDULED_TABLE_NAME

    @property
    def qualified(self) -> tuple[str, str]:
        """(schema, table)."""
        return split_table_name(self.name)

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(*self.qualified)


DEFAULT_SCHEDULED_TABLE = ScheduledTable()

# The columns a service writes; seq and scheduled_at take their defaults.
_COLUMNS: Final = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "deliver_at",
)


def create_sql(
    table: ScheduledTable = DEFAULT_SCHEDULED_TABLE,
    *,
    payload_type: str = "jsonb",
    headers_type: str = "jsonb",
) -> sql.Composed:
    """The DDL of sql/scheduled.sql for ``table`` (idempotent): the table, its indexes and the
    SQL functions, with payload and headers of the given types. Give the outbox's own types
    (information_schema.columns.data_type) so that a moved row is byte-for-byte the row
    ``add_event`` would have written."""
    for what, given in (("payload_type", payload_type), ("headers_type", headers_type)):
        if given not in COLUMN_TYPES:
            raise ValueError(f"{what} must be one of {', '.join(COLUMN_TYPES)}, not {given!r}")
    schema, name = table.qualified
    text = recipes.read("scheduled.sql")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return sql.SQL(body).format(
        table=table.identifier,
        payload_type=sql.SQL(payload_type),
        headers_type=sql.SQL(headers_type),
        due_index=sql.Identifier(f"{name}_due_idx"),
        schedule_function=sql.Identifier(schema, SCHEDULE_FUNCTION),
        cancel_function=sql.Identifier(schema, CANCEL_FUNCTION),
    )


def _insert(
    table: ScheduledTable,
    event_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None,
    deliver_at: datetime,
) -> tuple[sql.Composed, list[Any]]:
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        table.identifier,
        sql.SQL(", ").join(sql.Identifier(name) for name in _COLUMNS),
        sql.SQL(", ").join(sql.Placeholder() for _ in _COLUMNS),
    )
    # As add_event: text values go untyped, so the server parses each as its column's type (the
    # payload as the outbox's own type, which the scheduled table mirrors); deliver_at goes as a
    # timestamptz, its offset included.
    params: list[Any] = [
        str(event_id),
        aggregate_type,
        aggregate_id,
        event_type,
        encode_payload(payload),
        None if headers is None else encode_payload(dict(headers)),
        deliver_at,
    ]
    return query, params


@overload
def schedule_event(
    conn: SyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    deliver_at: datetime,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: ScheduledTable = DEFAULT_SCHEDULED_TABLE,
) -> uuid.UUID: ...


@overload
def schedule_event(
    conn: AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    deliver_at: datetime,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: ScheduledTable = DEFAULT_SCHEDULED_TABLE,
) -> Awaitable[uuid.UUID]: ...


def schedule_event(
    conn: SyncTarget | AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    deliver_at: datetime,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: ScheduledTable = DEFAULT_SCHEDULED_TABLE,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Schedule one event in the caller's current transaction, to be published at
    ``deliver_at``, and return its id (the outbox row and the Kafka ``id`` header get the same).

    Never commits. ``deliver_at`` must be timezone-aware (ValueError for a naive datetime); a
    time in the past is due at once. The event is published no earlier than ``deliver_at`` by
    the server's clock, and soon after it while a relay runs (docs/scheduled.md). ``payload``
    and ``headers`` are taken as by ``add_event``, trace context included. Raises
    NotInTransaction on an autocommit connection outside ``conn.transaction()``. With an
    AsyncConnection or AsyncCursor, await it.
    """
    require_aware(deliver_at)
    new_id = event_id or uuid.uuid4()
    # The scheduling span is the event's cause: its traceparent travels with the event (a
    # no-op without OpenTelemetry); a traceparent the caller set is kept.
    headers = tracing.with_trace_context(headers)
    query, params = _insert(
        table, new_id, aggregate_type, aggregate_id, event_type, payload, headers, deliver_at
    )
    return write_event(conn, query, params, new_id)


def _delete(table: ScheduledTable) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE id = %s").format(table.identifier)


@overload
def cancel_event(
    conn: SyncTarget, event_id: uuid.UUID, *, table: ScheduledTable = DEFAULT_SCHEDULED_TABLE
) -> bool: ...


@overload
def cancel_event(
    conn: AsyncTarget, event_id: uuid.UUID, *, table: ScheduledTable = DEFAULT_SCHEDULED_TABLE
) -> Awaitable[bool]: ...


def cancel_event(
    conn: SyncTarget | AsyncTarget,
    event_id: uuid.UUID,
    *,
    table: ScheduledTable = DEFAULT_SCHEDULED_TABLE,
) -> bool | Awaitable[bool]:
    """Delete a scheduled event that has not been moved into the outbox yet.

    True: it was waiting, and it will never be published once the caller's transaction commits.
    False: it had already been moved (it is, or will be, published; consumers see it) or was
    never scheduled. If the mover is moving it at that moment, this waits for the move to commit
    and returns False. Never commits; on an autocommit connection the delete commits by itself,
    which is safe (one statement). With an AsyncConnection or AsyncCursor, await it.
    """
    query = _delete(table)
    params = [str(event_id)]
    if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
        return _cancel_async(conn, query, params)
    cursor = conn.execute(query, params)
    return cursor.rowcount == 1


async def _cancel_async(conn: AsyncTarget, query: sql.Composed, params: list[Any]) -> bool:
    cursor = await conn.execute(query, params)
    return cursor.rowcount == 1
