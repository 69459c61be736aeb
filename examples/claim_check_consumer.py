"""A consumer of claim-checked events: large payloads come by reference and are fetched from the
outbox; everything else is read from the record as usual.

    export OUTBOX_DATABASE_URL=postgresql://reader@localhost/orders   # SELECT on the outbox
    export KAFKA_BOOTSTRAP_SERVERS=localhost:9092
    python examples/claim_check_consumer.py

With CDC_RELAY_CLAIM_CHECK_OVER_BYTES set on the relay, an event whose payload is larger than
that arrives with a small reference as its value and the header ``cdc-relay-claim-check: v1``
(docs/claim-check.md). ``resolve`` returns the payload either way, byte for byte what the relay
would have published. If the outbox row is gone (pruned before this consumer read it), it
raises PayloadGone: the claim-check retention is shorter than this consumer's lag, and the
consumer stops rather than skip the event. Offsets are committed only after an event is handled.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message

from cdc_relay.claimcheck import PayloadGone, resolve

CONSUMER = "order-archive"


def summary(message: Message, payload: bytes | None) -> str:
    """The consumer's own work; here, a line per event."""
    order = json.loads(payload) if payload is not None else None
    size = len(payload) if payload is not None else 0
    keys = sorted(order) if isinstance(order, dict) else []
    return f"{message.key()!r}: {size} bytes, keys {keys}"


def handle(conn: psycopg.Connection[Any], message: Message) -> str:
    """One record: its payload from the record itself, or from the outbox for a reference."""
    return summary(message, resolve(conn, message))


async def handle_async(conn: psycopg.AsyncConnection[Any], message: Message) -> str:
    """The same with psycopg's async connection (for an asyncio consumer)."""
    return summary(message, await resolve(conn, message))


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
    # Autocommit: each fetch is its own short read, holding no snapshot between records.
    with psycopg.connect(os.environ["OUTBOX_DATABASE_URL"], autocommit=True) as conn:
        try:
            while True:
                message = consumer.poll(1.0)
                if message is None or message.error() is not None:
                    continue
                try:
                    print(handle(conn, message))
                except PayloadGone as exc:
                    print(f"stopping: {exc}", file=sys.stderr)
                    return 1
                consumer.commit(message=message, asynchronous=False)
        except KeyboardInterrupt:
            pass
        finally:
            consumer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
