"""The consumer helper for claim-checked events: fetch the payload a reference stands for.

When the relay publishes an event by reference (cdc_relay.core.claimcheck, docs/claim-check.md),
``resolve`` gives a consumer the bytes it would have received as the value: the record's own
value for an ordinary record, the outbox row's payload for a reference. The bytes are those the
relay would have published: for a bytea payload the raw bytes, for any other type (jsonb, json,
text) the text PostgreSQL outputs for it, in UTF-8. Works with psycopg 3 sync and async
connections (and cursors); with an async one, await it. Reads in the caller's transaction (or
in autocommit) and never commits.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeAlias, overload

import psycopg
from psycopg import sql

from cdc_relay.core.claimcheck import (
    HEADER,
    ClaimCheck,
    HeadersLike,
    PayloadForm,
    parse_reference,
    payload_form,
)
from cdc_relay.core.names import split_table_name
from cdc_relay.errors import (
    ClaimCheckError,
    MalformedClaimCheck,
    PayloadChanged,
    PayloadGone,
    PayloadTypeUnsupported,
)

__all__ = [
    "ClaimCheck",
    "ClaimCheckError",
    "MalformedClaimCheck",
    "PayloadChanged",
    "PayloadGone",
    "PayloadTypeUnsupported",
    "fetch_payload",
    "resolve",
]

SyncTarget: TypeAlias = psycopg.Connection[Any] | psycopg.Cursor[Any]
AsyncTarget: TypeAlias = psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any]


class KafkaMessage(Protocol):
    """What is read of a consumed record (confluent-kafka's ``Message``)."""

    def value(self) -> bytes | None: ...

    def headers(self) -> HeadersLike: ...


Record: TypeAlias = KafkaMessage | tuple[bytes | None, HeadersLike]
Reference: TypeAlias = ClaimCheck | KafkaMessage | tuple[bytes | None, HeadersLike]


def _reference(record: Reference) -> ClaimCheck | None:
    if isinstance(record, ClaimCheck):
        return record
    if isinstance(record, tuple):
        value, headers = record
        return parse_reference(value, headers)
    return parse_reference(record.value(), record.headers())


def _value(record: Record) -> bytes | None:
    return record[0] if isinstance(record, tuple) else record.value()


# The payload column's type, and the type under its domains (a domain over a domain too).
PAYLOAD_TYPE_SQL = """
WITH RECURSIVE chain(column_type, oid, basetype, typtype) AS (
    SELECT t.oid, t.oid, t.typbasetype, t.typtype
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND a.attnum > 0
      AND NOT a.attisdropped
  UNION ALL
    SELECT c.column_type, t.oid, t.typbasetype, t.typtype
    FROM chain c JOIN pg_type t ON t.oid = c.basetype
    WHERE c.typtype = 'd'
)
SELECT column_type::int, oid::int FROM chain WHERE typtype <> 'd'
"""


def _type_params(table: str, payload_column: str) -> tuple[str, str]:
    return sql.Identifier(*split_table_name(table)).as_string(None), payload_column


def _form(row: tuple[Any, ...] | None, table: str, payload_column: str) -> PayloadForm:
    if row is None:
        raise ClaimCheckError(f"{table} has no column {payload_column!r} (or does not exist)")
    form = payload_form(row[0], row[1])
    if form is None:
        raise PayloadTypeUnsupported(table, payload_column)
    return form


def _payload_query(
    form: PayloadForm, table: str, id_column: str, payload_column: str
) -> sql.Composed:
    # The relay reads text in UTF-8 (its replication connection uses client_encoding UTF8):
    # convert_to gives those bytes whatever this session's encoding. A bytea's text would
    # depend on this session's bytea_output: it is fetched as bytea.
    expression = "{p}::bytea" if form in ("raw", "hex") else "convert_to({p}::text, 'UTF8')"
    return sql.SQL("SELECT " + expression + " FROM {t} WHERE {id} = %s").format(
        p=sql.Identifier(payload_column),
        t=sql.Identifier(*split_table_name(table)),
        id=sql.Identifier(id_column),
    )


def _published(
    form: PayloadForm, row: tuple[Any, ...] | None, reference: ClaimCheck, table: str
) -> bytes:
    if row is None:
        raise PayloadGone(reference.event_id, table)
    payload: bytes | None = row[0]
    if payload is not None and form == "hex":
        payload = b"\\x" + payload.hex().encode("ascii")
    return _checked(reference, table, payload)


def _checked(reference: ClaimCheck, table: str, payload: bytes | None) -> bytes:
    if payload is None or len(payload) != reference.size:
        found = None if payload is None else len(payload)
        raise PayloadChanged(reference.event_id, table, published=reference.size, found=found)
    return payload


def _not_a_reference() -> MalformedClaimCheck:
    return MalformedClaimCheck(
        f"not a claim-check reference (no {HEADER} header): use resolve() for a record that "
        "may be an ordinary one"
    )


@overload
def fetch_payload(
    conn: SyncTarget,
    record: Reference,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> bytes: ...


@overload
def fetch_payload(
    conn: AsyncTarget,
    record: Reference,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> Awaitable[bytes]: ...


def fetch_payload(
    conn: SyncTarget | AsyncTarget,
    record: Reference,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> bytes | Awaitable[bytes]:
    """The payload a claim-check reference stands for, exactly as the relay would have
    published it as the record's value.

    ``record``: a consumed message (confluent-kafka's ``Message``), a ``(value, headers)`` pair,
    or a parsed ClaimCheck. It is read from the table the reference names, or from ``table``
    (``schema.table``: a view or a replica's copy under another name), by ``id_column``.
    Raises MalformedClaimCheck if the record is not a valid reference, PayloadGone if the row
    was pruned (the retention is too short), PayloadChanged if it no longer holds the
    published payload. With an AsyncConnection or AsyncCursor, await it.
    """
    reference = _reference(record)
    if reference is None:
        raise _not_a_reference()
    name = table or reference.table
    if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
        return _fetch_async(conn, reference, name, id_column, payload_column)
    row = conn.execute(PAYLOAD_TYPE_SQL, _type_params(name, payload_column)).fetchone()
    form = _form(row, name, payload_column)
    query = _payload_query(form, name, id_column, payload_column)
    return _published(form, conn.execute(query, (reference.event_id,)).fetchone(), reference, name)


async def _fetch_async(
    conn: AsyncTarget, reference: ClaimCheck, name: str, id_column: str, payload_column: str
) -> bytes:
    cursor = await conn.execute(PAYLOAD_TYPE_SQL, _type_params(name, payload_column))
    form = _form(await cursor.fetchone(), name, payload_column)
    query = _payload_query(form, name, id_column, payload_column)
    row = await (await conn.execute(query, (reference.event_id,))).fetchone()
    return _published(form, row, reference, name)


@overload
def resolve(
    conn: SyncTarget,
    record: Record,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> bytes | None: ...


@overload
def resolve(
    conn: AsyncTarget,
    record: Record,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> Awaitable[bytes | None]: ...


def resolve(
    conn: SyncTarget | AsyncTarget,
    record: Record,
    *,
    table: str | None = None,
    id_column: str = "id",
    payload_column: str = "payload",
) -> bytes | Awaitable[bytes | None] | None:
    """The event's payload: the record's value for an ordinary record (None for a tombstone,
    which is what a NULL payload is published as), the fetched payload for a claim-checked one
    (see fetch_payload, whose errors it raises). With an async connection, await it."""
    reference = _reference(record)
    if reference is None:
        value = _value(record)
        if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
            return _ready(value)
        return value
    return fetch_payload(
        conn, reference, table=table, id_column=id_column, payload_column=payload_column
    )


async def _ready(value: bytes | None) -> bytes | None:
    return value
