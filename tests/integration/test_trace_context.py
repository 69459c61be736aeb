"""Trace context end to end: a span in the service, add_event, the real relay, the real broker,
and the consumer's inbox continuing the trace (spans read from the SDK's in-memory exporter)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cdc_relay import recipes, tracing
from cdc_relay.inbox import event_id_of, process_once, process_once_async
from cdc_relay.outbox import add_event
from tests.integration.conftest import Outbox
from tests.integration.relay_process import RelayProcess, execute, query
from tests.kafka_helpers import ConsumedRecord, consume_all
from tests.unit.test_tracing import recorded_spans, traceparent_of


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


def place_order(conn: psycopg.Connection, order_id: str) -> uuid.UUID:
    """The service's side: the business row and its event in one transaction, the event's
    headers carrying the current trace context (if any)."""
    with conn.transaction():
        conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
        return add_event(
            conn,
            aggregate_type="order",
            aggregate_id=order_id,
            event_type="OrderPlaced",
            payload={"order": order_id},
            headers={"tenant": "acme"},  # add_event adds the span's traceparent
        )


def test_the_consumer_span_has_the_producer_span_as_parent_through_the_relay(
    outbox: Outbox, kafka: str, spans: InMemorySpanExporter
):
    tracer = trace.get_tracer("order-service")
    execute(outbox.url, "CREATE TABLE orders (id text PRIMARY KEY)")
    with psycopg.connect(outbox.url, autocommit=True) as conn:
        with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER) as request:
            traced_id = place_order(conn, "order-1")
        untraced_id = place_order(conn, "order-2")  # no active span: nothing to continue
    producer = request.get_span_context()

    with RelayProcess(outbox.env) as relay:
        records = consume_all(kafka, [outbox.topic("order")], expected=2, timeout=60, linger=0.5)
        assert relay.stop() == 0, relay.log()
    by_id = {event_id_of(r.headers): r for r in records}
    assert sorted(by_id) == sorted([str(traced_id), str(untraced_id)])
    traced, untraced = by_id[str(traced_id)], by_id[str(untraced_id)]

    # What the consumer reads: the producer's traceparent, byte for byte, next to the other
    # headers; an event added outside any span has none.
    assert traced.header("traceparent") == traceparent_of(producer).encode("ascii")
    assert traced.header("tenant") == b"acme"
    untraced_names = [name for name, _ in untraced.headers]
    assert untraced_names == ["id", "event_type", "aggregate_type", "tenant"]

    execute(outbox.url, recipes.read("inbox.sql"))
    execute(outbox.url, "CREATE TABLE shipments (order_id text PRIMARY KEY)")
    consumer_tracer = trace.get_tracer("shipping")

    def apply(conn: psycopg.Connection, record: ConsumedRecord) -> bool:
        def ship() -> None:
            with consumer_tracer.start_as_current_span("ship"):
                conn.execute("INSERT INTO shipments VALUES (%s)", ((record.key or b"").decode(),))

        return process_once(
            conn,
            event_id_of(record.headers),
            ship,
            consumer="shipping",
            headers=record.headers,
            topic=record.topic,
            key=record.key,
        )

    spans.clear()
    with psycopg.connect(outbox.url, autocommit=True) as conn:
        # The traced record delivered twice, as after a relay restart: applied once.
        assert [apply(conn, r) for r in (traced, traced, untraced)] == [True, False, True]
    assert query(outbox.url, "SELECT order_id FROM shipments ORDER BY 1") == [
        ("order-1",),
        ("order-2",),
    ]

    finished = spans.get_finished_spans()
    consumed = [s for s in finished if s.kind is SpanKind.CONSUMER]
    assert [s.name for s in consumed] == [f"process {outbox.topic('order')}"] * 2
    first, duplicate = consumed
    for span in consumed:
        assert span.parent is not None
        assert (span.parent.trace_id, span.parent.span_id) == (producer.trace_id, producer.span_id)
        assert span.context.trace_id == producer.trace_id
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "kafka"
        assert span.attributes["messaging.destination.name"] == outbox.topic("order")
        assert span.attributes["messaging.kafka.message.key"] == "order-1"
        assert span.attributes["messaging.message.id"] == str(traced_id)
    assert first.attributes is not None and duplicate.attributes is not None
    assert tracing.DUPLICATE_ATTRIBUTE not in first.attributes
    assert duplicate.attributes[tracing.DUPLICATE_ATTRIBUTE] is True

    # The handler's own spans nest under the consumer's span; the untraced record's handler ran
    # without one (its span starts a trace of its own).
    ship_traced, ship_untraced = (s for s in finished if s.name == "ship")
    assert ship_traced.parent is not None
    assert ship_traced.parent.span_id == first.context.span_id
    assert ship_untraced.parent is None
    assert ship_untraced.context.trace_id != producer.trace_id


def test_an_async_consumer_continues_the_trace_too(
    outbox: Outbox, kafka: str, spans: InMemorySpanExporter
):
    execute(outbox.url, "CREATE TABLE orders (id text PRIMARY KEY)")
    tracer = trace.get_tracer("order-service")
    with (
        psycopg.connect(outbox.url, autocommit=True) as conn,
        tracer.start_as_current_span("place order") as request,
    ):
        event_id = place_order(conn, "order-9")
    producer = request.get_span_context()
    with RelayProcess(outbox.env) as relay:
        (record,) = consume_all(kafka, [outbox.topic("order")], expected=1, timeout=60)
        assert relay.stop() == 0, relay.log()
    execute(outbox.url, recipes.read("inbox.sql"))

    async def consume() -> bool:
        async with await psycopg.AsyncConnection.connect(outbox.url, autocommit=True) as conn:

            async def effect() -> None:
                await conn.execute("SELECT 1")

            return await process_once_async(
                conn,
                str(event_id),
                effect,
                headers=record.headers,
                topic=record.topic,
                key=record.key,
            )

    spans.clear()
    assert asyncio.run(consume()) is True
    (span,) = spans.get_finished_spans()
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (producer.trace_id, producer.span_id)
