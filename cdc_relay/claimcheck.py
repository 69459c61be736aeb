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
    MalformedClaimCheck,
    parse_reference,
)
from cdc_relay.core.names import split_table_name
from cdc_relay.errors import RelayError

__all__ = [
    "ClaimCheck",
    "ClaimCheckError",
    "MalformedClaimCheck",
    "PayloadChanged",
    "PayloadGone",
    "fetch_payload",
    "resolve",
]

SyncTarget: TypeAlias = psycopg.Connection[Any] | psycopg.Cursor[Any]
AsyncTarget: TypeAlias = psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any]

BYTEA_OID = 17


class KafkaMessage(Protocol):
    """What is read of a consumed record (confluent-kafka's ``Message``)."""

    def value(self) -> bytes | None: ...

    def headers(self) -> HeadersLike: ...


Record: TypeAlias = KafkaMessage | tuple[bytes | None, HeadersLike]
Reference: TypeAlias = ClaimCheck | KafkaMessage | tuple[bytes | None, HeadersLike]


class ClaimCheckError(RelayError):
    """The payload of a claim-checked event cannot be fetched."""


class PayloadGone(ClaimCheckError):
    """The outbox row of a claim-checked event is gone."""

    def __init__(self, event_id: str, table: str) -> None:
        self.event_id = event_id
        self.table = table
        super().__init__(
            f"the outbox row of claim-checked event {event_id} is gone from {table}: "
            "it was pruned before this consumer read it, so the claim-check retention "
            "(CDC_RELAY_CLAIM_CHECK_RETENTION, prune) is too short for this consumer's lag "
            "and replay horizon (docs/claim-check.md)"
        )


class PayloadChanged(ClaimCheckError):
    """The outbox row of a claim-checked event no longer holds the payload that was
    published: its size differs from the reference's (the row was updated, or the id was
    reused), or its payload is NULL."""

    def __init__(self, event_id: str, table: str, *, published: int, found: int | None) -> None:
        self.event_id = event_id
        self.table = table
        self.published = published
        self.found = found
        now = "a NULL payload" if found is None else f"{found} bytes"
        super().__init__(
            f"the outbox row of claim-checked event {event_id} in {table} holds "
            f"{now}, but {published} bytes were published: the row changed after it was "
            "published (outbox rows must never be updated)"
        )


def _reference(record: Reference) -> ClaimCheck | None:
    if isinstance(record, ClaimCheck):
        return record
    if isinstance(record, tuple):
        value, headers = record
        return parse_reference(value, headers)
    return parse_reference(record.value(), record.headers())


def _value(record: Record) -> bytes | None:
    return record[0] if isinstance(record, tuple) else record.value()


def _queries(
    reference: ClaimCheck, table: str | None, id_column: str, payload_column: str
) -> tuple[str, sql.Composed, sql.Composed]:
    name = table or reference.table
    target = sql.Identifier(*split_table_name(name))
    payload, column_id = sql.Identifier(payload_column), sql.Identifier(id_column)
    # One statement for every payload type: the relay publishes the text output of a non-bytea
    # payload, in UTF-8 (its replication connection uses client_encoding UTF8), which is what
    # convert_to(payload::text, 'UTF8') gives whatever this session's encoding. A bytea payload
    # is published as its raw bytes; its text output depends on this session's bytea_output,
    # so it is fetched again as bytea (a second, rare round trip).
    text = sql.SQL(
        "SELECT pg_typeof({p})::oid, CASE WHEN pg_typeof({p}) = 'bytea'::regtype THEN NULL "
        "ELSE convert_to({p}::text, 'UTF8') END, {p} IS NULL FROM {t} WHERE {id} = %s"
    ).format(p=payload, t=target, id=column_id)
    raw = sql.SQL("SELECT {p} FROM {t} WHERE {id} = %s").format(p=payload, t=target, id=column_id)
    return name, text, raw


def _text_row(
    row: tuple[Any, ...] | None, reference: ClaimCheck, table: str
) -> tuple[bool, bytes | None]:
    """The first statement's row: whether the payload is a bytea to fetch as such, and the
    payload (a non-bytea one, or None)."""
    if row is None:
        raise PayloadGone(reference.event_id, table)
    type_oid, payload, is_null = row
    return type_oid == BYTEA_OID and not is_null, payload


def _raw_row(row: tuple[Any, ...] | None, reference: ClaimCheck, table: str) -> bytes | None:
    if row is None:
        raise PayloadGone(reference.event_id, table)  # pruned between the two statements
    payload: bytes | None = row[0]
    return payload


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
    name, text, raw = _queries(reference, table, id_column, payload_column)
    if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
        return _fetch_async(conn, reference, name, text, raw)
    params = (reference.event_id,)
    raw_needed, payload = _text_row(conn.execute(text, params).fetchone(), reference, name)
    if raw_needed:
        payload = _raw_row(conn.execute(raw, params).fetchone(), reference, name)
    return _checked(reference, name, payload)


async def _fetch_async(
    conn: AsyncTarget, reference: ClaimCheck, name: str, text: sql.Composed, raw: sql.Composed
) -> bytes:
    params = (reference.event_id,)
    row = await (await conn.execute(text, params)).fetchone()
    raw_needed, payload = _text_row(row, reference, name)
    if raw_needed:
        row = await (await conn.execute(raw, params)).fetchone()
        payload = _raw_row(row, reference, name)
    return _checked(reference, name, payload)


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
