"""The consumer helper: an idempotent-consumer inbox, so at-least-once delivery ends in
exactly-once effects.

The relay may deliver an event twice (after a crash, what was in flight is sent again; a
consumer may also re-read after a rebalance). A consumer that records the event id (the Kafka
header ``id``) in the same database transaction as the event's effects, with
``INSERT ... ON CONFLICT DO NOTHING``, sees each duplicate come back as "already processed" and
skips it. The table is created by sql/inbox.sql. Given the record's headers, process_once
also continues the producer's trace (cdc_relay.tracing) when OpenTelemetry is installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, overload

import psycopg
from psycopg import sql

from cdc_relay import tracing
from cdc_relay.core.names import split_table_name
from cdc_relay.errors import MissingEventId
from cdc_relay.outbox import AsyncTarget, SyncTarget, require_transaction
from cdc_relay.tracing import KafkaHeaders as KafkaHeaders  # defined there, kept importable here

if TYPE_CHECKING:
    from opentelemetry.trace import Span

DEFAULT_INBOX = "public.processed_events"


def event_id_of(headers: KafkaHeaders) -> str:
    """The event id from a consumed record's headers (``message.headers()`` of confluent-kafka)."""
    for name, value in headers or ():
        if name == "id" and value is not None:
            return value.decode("utf-8") if isinstance(value, bytes) else value
    raise MissingEventId(MissingEventId.__doc__)


def _claim_query(table: str) -> sql.Composed:
    return sql.SQL(
        "INSERT INTO {} (consumer, event_id) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1"
    ).format(sql.Identifier(*split_table_name(table)))


# In autocommit the claim would commit on its own: a crash before the effects commit would
# then mark the event processed without its effects.
_CLAIM_NEEDS_A_TRANSACTION = (
    "the inbox claim needs a transaction: on an autocommit connection use "
    "`with conn.transaction():` around the claim and the event's effects"
)


@overload
def claim(
    conn: SyncTarget, event_id: str, *, consumer: str = "", table: str = DEFAULT_INBOX
) -> bool: ...


@overload
def claim(
    conn: AsyncTarget, event_id: str, *, consumer: str = "", table: str = DEFAULT_INBOX
) -> Awaitable[bool]: ...


def claim(
    conn: SyncTarget | AsyncTarget, event_id: str, *, consumer: str = "", table: str = DEFAULT_INBOX
) -> bool | Awaitable[bool]:
    """Record ``event_id`` as processed by ``consumer`` in the caller's transaction.

    True when the event is new (apply its effects, then commit), False when it was processed
    before (skip it). A concurrent claim of the same id waits for the other transaction and then
    returns False if that one committed. Never commits. With an async connection, await it.
    """
    query = _claim_query(table)
    if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
        return _claim_async(conn, query, consumer, str(event_id))
    require_transaction(conn, _CLAIM_NEEDS_A_TRANSACTION)
    cursor = conn.execute(query, (consumer, str(event_id)))
    return cursor.fetchone() is not None


async def _claim_async(
    conn: AsyncTarget, query: sql.Composed, consumer: str, event_id: str
) -> bool:
    require_transaction(conn, _CLAIM_NEEDS_A_TRANSACTION)
    cursor = await conn.execute(query, (consumer, event_id))
    return await cursor.fetchone() is not None


def process_once(
    conn: psycopg.Connection[Any],
    event_id: str,
    handler: Callable[[], object],
    *,
    consumer: str = "",
    table: str = DEFAULT_INBOX,
    headers: KafkaHeaders = None,
    topic: str | None = None,
    key: bytes | str | None = None,
) -> bool:
    """Run ``handler`` (which writes through ``conn``) and record the event, in one transaction,
    unless the event was processed before. Returns whether the handler ran.

    Opens a transaction (a savepoint when the caller already has one), so an exception from the
    handler rolls back its effects and the claim together: the event is retried next time.

    With the record's ``headers`` (and its ``topic`` and ``key`` for the span's attributes), a
    record that carries a ``traceparent`` is processed inside a CONSUMER span whose parent is
    the producer's span (tracing.process_span); a duplicate's span says so.
    """
    with (
        tracing.process_span(headers, topic=topic, key=key, event_id=event_id) as span,
        conn.transaction(),
    ):
        if not claim(conn, event_id, consumer=consumer, table=table):
            _mark_duplicate(span)
            return False
        handler()
    return True


async def process_once_async(
    conn: psycopg.AsyncConnection[Any],
    event_id: str,
    handler: Callable[[], Awaitable[object]],
    *,
    consumer: str = "",
    table: str = DEFAULT_INBOX,
    headers: KafkaHeaders = None,
    topic: str | None = None,
    key: bytes | str | None = None,
) -> bool:
    """process_once for an AsyncConnection and an async handler."""
    # The span is the current one of this task only (contextvars), also across the awaits.
    with tracing.process_span(headers, topic=topic, key=key, event_id=event_id) as span:
        async with conn.transaction():
            if not await claim(conn, event_id, consumer=consumer, table=table):
                _mark_duplicate(span)
                return False
            await handler()
    return True


def _mark_duplicate(span: Span | None) -> None:
    if span is not None:
        span.set_attribute(tracing.DUPLICATE_ATTRIBUTE, True)
