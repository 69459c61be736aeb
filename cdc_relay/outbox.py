"""The producer helpers: write an outbox event inside the application's own transaction.

``add_event`` inserts one row into an outbox table; ``emit_event`` writes the event into the
WAL as a logical decoding message (``pg_logical_emit_message``), with no table at all. Both use
the caller's connection and never commit: the event is published when, and only when, the
caller's transaction commits together with its business rows. They work with psycopg 3 sync and
async connections (and cursors); with an async one they return an awaitable.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeAlias, overload

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from cdc_relay import tracing
from cdc_relay.core import framing
from cdc_relay.core.mapping import ColumnMapping
from cdc_relay.core.names import split_table_name
from cdc_relay.errors import NotInTransaction

SyncTarget: TypeAlias = psycopg.Connection[Any] | psycopg.Cursor[Any]
AsyncTarget: TypeAlias = psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any]
Payload: TypeAlias = (
    bytes | bytearray | memoryview | Mapping[str, Any] | list[Any] | str | int | float | bool | None
)


# The relay's default CDC_RELAY_MESSAGE_PREFIX (cdc_relay.settings, which this module does not
# import; tests/unit/test_framing.py checks that both agree).
DEFAULT_PREFIX = "cdc_relay.outbox"
# Where add_event(..., deliver_at=...) leaves scheduled events: cdc_relay.scheduled, and what
# `setup --create-table` creates for CDC_RELAY_SCHEDULED_TABLE=public.outbox_scheduled.
DEFAULT_SCHEDULED_TABLE = "public.outbox_scheduled"


class RelaySettings(Protocol):
    """What ``OutboxTable.from_settings`` reads of the relay's settings (``load_settings()``),
    so that this module, which services import, never imports the relay itself."""

    @property
    def outbox_table(self) -> str: ...

    def table_mapping(self, table: str) -> ColumnMapping: ...


@dataclass(frozen=True, slots=True)
class OutboxTable:
    """Where events go: the outbox table and its column roles (the relay's defaults)."""

    name: str = "public.outbox"
    columns: ColumnMapping = field(default_factory=ColumnMapping)

    @classmethod
    def from_settings(cls, settings: RelaySettings, table: str | None = None) -> OutboxTable:
        """A table the relay configured by ``settings`` reads: ``table`` (one of
        CDC_RELAY_OUTBOX_TABLE), or the first it lists, with its column mapping."""
        if table is None:
            listed = [name.strip() for name in settings.outbox_table.split(",") if name.strip()]
            if not listed:
                raise ValueError("CDC_RELAY_OUTBOX_TABLE lists no table: use emit_event")
            table = listed[0]
        return cls(name=table, columns=settings.table_mapping(table))


DEFAULT_TABLE = OutboxTable()


def encode_payload(payload: Payload) -> str:
    """The payload as JSON text. Bytes are taken as already-encoded JSON (UTF-8) and passed on
    unchanged; anything else goes through ``json.dumps``. A jsonb column still validates it."""
    if isinstance(payload, bytes | bytearray | memoryview):
        try:
            return bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a pre-encoded payload must be UTF-8 JSON text") from None
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _insert(
    table: OutboxTable,
    event_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None,
) -> tuple[sql.Composed, list[Any]]:
    columns = table.columns
    names = [
        columns.id,
        columns.aggregate_type,
        columns.aggregate_id,
        columns.event_type,
        columns.payload,
    ]
    values: list[Any] = [
        event_id,
        aggregate_type,
        aggregate_id,
        event_type,
        encode_payload(payload),
    ]
    if headers is not None:
        if columns.headers is None:
            raise ValueError("headers were given but the outbox has no headers column")
        names.append(columns.headers)
        values.append(encode_payload(dict(headers)))
    # Every value goes as a str, which psycopg sends untyped ("unknown"): the server then parses
    # it as its column's type, so uuid or text ids and jsonb, json or text payloads all work.
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(*split_table_name(table.name)),
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.SQL(", ").join(sql.Placeholder() for _ in names),
    )
    return query, [str(value) for value in values]


def require_transaction(target: SyncTarget | AsyncTarget, message: str | None = None) -> None:
    """NotInTransaction unless ``target`` (a connection or one of its cursors) is inside a
    transaction that the caller will commit."""
    connection = (
        target
        if isinstance(target, psycopg.Connection | psycopg.AsyncConnection)
        else target.connection
    )
    # On an autocommit connection outside `conn.transaction()` the insert would commit on its own,
    # before (or without) the business rows: exactly the dual write the outbox exists to avoid.
    if connection.autocommit and connection.info.transaction_status == TransactionStatus.IDLE:
        raise NotInTransaction(message)


@overload
def add_event(
    conn: SyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: OutboxTable = DEFAULT_TABLE,
    deliver_at: datetime | None = None,
    scheduled_table: str = DEFAULT_SCHEDULED_TABLE,
) -> uuid.UUID: ...


@overload
def add_event(
    conn: AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: OutboxTable = DEFAULT_TABLE,
    deliver_at: datetime | None = None,
    scheduled_table: str = DEFAULT_SCHEDULED_TABLE,
) -> Awaitable[uuid.UUID]: ...


def add_event(
    conn: SyncTarget | AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    table: OutboxTable = DEFAULT_TABLE,
    deliver_at: datetime | None = None,
    scheduled_table: str = DEFAULT_SCHEDULED_TABLE,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Insert one outbox event in the caller's current transaction and return its id.

    Never commits. ``payload`` is any JSON-serialisable value, or bytes of already-encoded JSON;
    ``headers`` (a JSON object) become Kafka headers; inside an OpenTelemetry span they also
    carry its W3C ``traceparent`` and ``tracestate`` (cdc_relay.tracing). With ``deliver_at``
    (an aware datetime) the event waits in ``scheduled_table`` instead, and is published no
    earlier than that (cdc_relay.scheduled.schedule_event; the relay needs
    CDC_RELAY_SCHEDULED_TABLE). Raises NotInTransaction on an autocommit connection outside
    ``conn.transaction()``. With an AsyncConnection or AsyncCursor, await it.
    """
    if deliver_at is not None:
        from cdc_relay import scheduled  # it builds on this module

        return scheduled.schedule_event(
            conn,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            event_type=event_type,
            payload=payload,
            headers=headers,
            event_id=event_id,
            deliver_at=deliver_at,
            table=scheduled.ScheduledTable(scheduled_table),
        )
    new_id = event_id or uuid.uuid4()
    if table.columns.headers is not None:
        # The current span's traceparent/tracestate, when there is one (a no-op without
        # OpenTelemetry); a traceparent the caller set is kept.
        headers = tracing.with_trace_context(headers)
    query, params = _insert(
        table, new_id, aggregate_type, aggregate_id, event_type, payload, headers
    )
    return write_event(conn, query, params, new_id)


def write_event(
    conn: SyncTarget | AsyncTarget, query: sql.Composed | str, params: list[Any], new_id: uuid.UUID
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Execute the event's statement in the caller's transaction (awaitable on an async
    connection); NotInTransaction where it would commit on its own."""
    if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
        return _write_async(conn, query, params, new_id)
    require_transaction(conn)
    conn.execute(query, params)
    return new_id


async def _write_async(
    conn: AsyncTarget, query: sql.Composed | str, params: list[Any], new_id: uuid.UUID
) -> uuid.UUID:
    require_transaction(conn)
    await conn.execute(query, params)
    return new_id


# --------------------------------------------------------------------------- events as messages

# The server fills in the timestamp (the transaction's start, as a table's created_at default),
# between the framing's head and body (core/framing.py).
_EMIT = (
    "SELECT pg_logical_emit_message(true, %s, %s::bytea "
    "|| int8send(floor(extract(epoch FROM now()) * 1000)::bigint) || %s::bytea)"
)


def message_payload(payload: Payload) -> bytes | None:
    """The payload bytes of a message event: bytes exactly as given (any bytes, not only
    UTF-8 JSON), None as a null value (a tombstone), anything else as compact JSON."""
    if payload is None:
        return None
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return encode_payload(payload).encode("utf-8")


def message_headers(headers: Mapping[str, Any] | None) -> list[tuple[str, bytes]]:
    """Kafka headers as a table row's headers column gives them: a string as its UTF-8, bytes
    as they are, any other value as its compact JSON text."""
    out = []
    for name, value in (headers or {}).items():
        if isinstance(value, str):
            out.append((name, value.encode("utf-8")))
        elif isinstance(value, bytes | bytearray | memoryview):
            out.append((name, bytes(value)))
        else:
            out.append((name, encode_payload(value).encode("utf-8")))
    return out


def _emit(
    prefix: str,
    event_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None,
) -> list[Any]:
    if not prefix:
        raise ValueError("emit_event needs a message prefix (CDC_RELAY_MESSAGE_PREFIX)")
    value = message_payload(payload)
    body = framing.encode_body(
        event_id=str(event_id),
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        headers=message_headers(headers),
        payload=value,
    )
    return [prefix, framing.encode_head(null_payload=value is None), body]


@overload
def emit_event(
    conn: SyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> uuid.UUID: ...


@overload
def emit_event(
    conn: AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> Awaitable[uuid.UUID]: ...


def emit_event(
    conn: SyncTarget | AsyncTarget,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Payload,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Write one event as a transactional logical decoding message in the caller's current
    transaction and return its id: no table, no row, nothing to prune.

    Never commits. ``payload``: bytes are sent exactly as given (any bytes); None is a null
    value (a tombstone); anything else is sent as compact JSON. ``headers`` become Kafka
    headers, with the current OpenTelemetry span's trace context. ``prefix`` must be the
    relay's CDC_RELAY_MESSAGE_PREFIX. Raises NotInTransaction on an autocommit connection
    outside ``conn.transaction()``. With an AsyncConnection or AsyncCursor, await it.
    """
    new_id = event_id or uuid.uuid4()
    headers = tracing.with_trace_context(headers)  # as in add_event
    params = _emit(prefix, new_id, aggregate_type, aggregate_id, event_type, payload, headers)
    return write_event(conn, _EMIT, params, new_id)
