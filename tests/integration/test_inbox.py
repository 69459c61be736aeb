"""The inbox: duplicates of an event are applied once, in the consumer's own transaction.
Also drives examples/order_service.py and examples/inbox_consumer.py end to end."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

from cdc_relay import recipes
from cdc_relay.inbox import MissingEventId, claim, event_id_of, process_once, process_once_async
from cdc_relay.outbox import NotInTransaction
from tests.integration.conftest import Outbox
from tests.integration.relay_process import RelayProcess, execute, query
from tests.kafka_helpers import consume_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_services_ship_each_order_once_despite_redelivery(outbox: Outbox, kafka: str):
    service = load_example("order_service")
    consumer = load_example("inbox_consumer")
    with psycopg.connect(outbox.url, autocommit=True) as conn:
        conn.execute(service.SCHEMA)
        placed = [
            service.place_order(conn, f"o-{n}", customer, Decimal("9.50"))
            for n, customer in enumerate(["alice", "bob", "chen"])
        ]
        with pytest.raises(service.PaymentDeclined):
            service.place_order(conn, "o-bad", "mallory", Decimal("1"))

    with RelayProcess(outbox.env) as relay:
        records = consume_all(kafka, [outbox.topic("order")], expected=3, timeout=60, linger=1.0)
        assert relay.stop() == 0
    assert sorted((r.header("id") or b"").decode() for r in records) == sorted(map(str, placed))

    with psycopg.connect(outbox.url, autocommit=True) as conn:
        consumer.prepare(conn)
        # Every record delivered twice, as after a relay restart or a consumer rewind.
        applied = [consumer.apply_event(conn, r.headers, r.value or b"") for r in records + records]
    assert applied == [True] * 3 + [False] * 3
    assert query(outbox.url, "SELECT order_id, customer FROM shipments ORDER BY 1") == [
        ("o-0", "alice"),
        ("o-1", "bob"),
        ("o-2", "chen"),
    ]
    assert query(outbox.url, "SELECT id FROM orders WHERE id = 'o-bad'") == []


def test_a_claim_is_undone_with_its_transaction(db: str):
    execute(db, recipes.read("inbox.sql"))
    with psycopg.connect(db) as conn:
        assert claim(conn, "e-1") is True
        conn.rollback()  # the effects failed: the event must be processed again
        assert claim(conn, "e-1") is True
        assert claim(conn, "e-1") is False  # a duplicate within the same transaction
        assert claim(conn, "e-1", consumer="other") is True  # consumers are independent
        conn.commit()
        assert claim(conn, "e-1") is False
        conn.commit()
    assert query(db, "SELECT consumer, event_id FROM processed_events ORDER BY 1") == [
        ("", "e-1"),
        ("other", "e-1"),
    ]


def test_a_failing_handler_rolls_back_its_effects_and_the_claim(db: str):
    execute(db, recipes.read("inbox.sql"))
    execute(db, "CREATE TABLE effects (event_id text)")
    with psycopg.connect(db, autocommit=True) as conn:

        def fail() -> None:
            conn.execute("INSERT INTO effects VALUES ('e-1')")
            raise RuntimeError("downstream unavailable")

        with pytest.raises(RuntimeError):
            process_once(conn, "e-1", fail)
        assert query(db, "SELECT count(*) FROM processed_events") == [(0,)]

        def succeed() -> None:
            conn.execute("INSERT INTO effects VALUES ('e-1')")

        assert process_once(conn, "e-1", succeed) is True
        assert process_once(conn, "e-1", succeed) is False
        with pytest.raises(NotInTransaction):
            claim(conn, "e-2")  # autocommit, outside conn.transaction()
    assert query(db, "SELECT event_id FROM effects") == [("e-1",)]


def test_async_consumers_process_once_too(db: str):
    execute(db, recipes.read("inbox.sql"))
    execute(db, "CREATE TABLE effects (event_id text)")

    async def consume_twice() -> list[bool]:
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:

            async def effect() -> None:
                await conn.execute("INSERT INTO effects VALUES ('e-9')")

            return [await process_once_async(conn, "e-9", effect) for _ in range(2)]

    assert asyncio.run(consume_twice()) == [True, False]
    assert query(db, "SELECT event_id FROM effects") == [("e-9",)]


def test_the_event_id_comes_from_the_id_header():
    assert event_id_of([("event_type", b"X"), ("id", b"0b7e-1")]) == "0b7e-1"
    with pytest.raises(MissingEventId):
        event_id_of([("event_type", b"X")])
    with pytest.raises(MissingEventId):
        event_id_of(None)
