"""A small order service: an order and its OrderPlaced event commit together, or not at all.

    export CDC_RELAY_DATABASE_URL=postgresql://app@localhost/shop
    python examples/order_service.py order-42 alice 12.50

The outbox table must exist (`cdc-relay setup --create-table`); `cdc-relay run` then publishes
the event to topic outbox.event.order with key order-42.
"""

from __future__ import annotations

import os
import sys
import uuid
from decimal import Decimal

import psycopg

from cdc_relay.outbox import add_event

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id       text    PRIMARY KEY,
    customer text    NOT NULL,
    total    numeric NOT NULL CHECK (total > 0)
)
"""


class PaymentDeclined(Exception):
    pass


def place_order(
    conn: psycopg.Connection[tuple[object, ...]], order_id: str, customer: str, total: Decimal
) -> uuid.UUID:
    """Insert the order and its event in one transaction; returns the event id."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO orders (id, customer, total) VALUES (%s, %s, %s)",
            (order_id, customer, total),
        )
        event_id = add_event(
            conn,
            aggregate_type="order",
            aggregate_id=order_id,
            event_type="OrderPlaced",
            payload={"order": order_id, "customer": customer, "total": str(total)},
            headers={"source": "order-service"},
        )
        if customer == "mallory":
            # Anything that fails before the commit takes the order and its event with it.
            raise PaymentDeclined(order_id)
    return event_id


def main(argv: list[str]) -> int:
    order_id, customer, total = argv
    with psycopg.connect(os.environ["CDC_RELAY_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(SCHEMA)
        event_id = place_order(conn, order_id, customer, Decimal(total))
    print(f"order {order_id} placed, event {event_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
