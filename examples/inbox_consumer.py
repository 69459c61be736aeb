"""An idempotent consumer: each OrderPlaced event creates one shipment, however often it arrives.

    export SHIPPING_DATABASE_URL=postgresql://shipping@localhost/shipping
    export KAFKA_BOOTSTRAP_SERVERS=localhost:9092
    python examples/inbox_consumer.py

The event id (Kafka header `id`) is claimed in cdc_relay's inbox table (sql/inbox.sql) in the
same transaction as the shipment; a duplicate finds its claim and is skipped. Offsets are
committed to Kafka only after the database transaction, so a crash in between re-delivers the
event, and the inbox turns that into a no-op.
"""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
from confluent_kafka import Consumer

from cdc_relay import recipes
from cdc_relay.inbox import event_id_of, process_once

CONSUMER = "shipping"
SCHEMA = """
CREATE TABLE IF NOT EXISTS shipments (
    order_id text PRIMARY KEY,
    customer text NOT NULL,
    event_id text NOT NULL
)
"""


def prepare(conn: psycopg.Connection[Any]) -> None:
    conn.execute(recipes.read("inbox.sql"))
    conn.execute(SCHEMA)


def apply_event(
    conn: psycopg.Connection[Any], headers: list[tuple[str, bytes | None]], value: bytes
) -> bool:
    """Apply one consumed record; returns False for a duplicate."""
    event_id = event_id_of(headers)
    order = json.loads(value)

    def ship() -> None:
        conn.execute(
            "INSERT INTO shipments (order_id, customer, event_id) VALUES (%s, %s, %s)",
            (order["order"], order["customer"], event_id),
        )

    return process_once(conn, event_id, ship, consumer=CONSUMER)


def main() -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": CONSUMER,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe(["outbox.event.order"])
    with psycopg.connect(os.environ["SHIPPING_DATABASE_URL"], autocommit=True) as conn:
        prepare(conn)
        try:
            while True:
                message = consumer.poll(1.0)
                if message is None or message.error() is not None:
                    continue
                applied = apply_event(conn, message.headers() or [], message.value() or b"")
                print(("shipped" if applied else "duplicate, skipped"), message.key())
                consumer.commit(message=message, asynchronous=False)
        except KeyboardInterrupt:
            pass
        finally:
            consumer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
