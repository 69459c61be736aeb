"""The producer helpers (cdc_relay.outbox.add_event and the SQL function cdc_relay_add_event)
inside real transactions: what commits is published, what rolls back is not."""

from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest

from cdc_relay import recipes
from cdc_relay.core.mapping import ColumnMapping
from cdc_relay.outbox import NotInTransaction, OutboxTable, add_event
from tests.integration.conftest import Outbox
from tests.integration.relay_process import (
    RelayProcess,
    current_lsn,
    execute,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all


def _orders(url: str) -> None:
    execute(url, "CREATE TABLE orders (id text PRIMARY KEY, total numeric NOT NULL)")


def test_committed_events_are_published_and_a_rollback_publishes_nothing(
    outbox: Outbox, kafka: str
):
    _orders(outbox.url)
    execute(outbox.url, recipes.read("add_event.sql"))
    with RelayProcess(outbox.env) as relay:
        # Sync connection, psycopg's default (non-autocommit) mode: the caller commits.
        with psycopg.connect(outbox.url) as conn:
            conn.execute("INSERT INTO orders VALUES ('o-1', 10)")
            committed = add_event(
                conn,
                aggregate_type="order",
                aggregate_id="o-1",
                event_type="OrderPlaced",
                payload={"total": 10, "items": ["é"]},
                headers={"trace": "t-1"},
            )
            conn.commit()
            # The same in a transaction that rolls back: neither the order nor the event exist.
            conn.execute("INSERT INTO orders VALUES ('o-bad', -1)")
            rolled_back = add_event(
                conn,
                aggregate_type="order",
                aggregate_id="o-bad",
                event_type="OrderPlaced",
                payload={"total": -1},
            )
            conn.rollback()
            # An autocommit connection inside conn.transaction(), with a pre-encoded payload.
            conn.autocommit = True
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES ('o-2', 20)")
                pre_encoded = add_event(
                    conn.cursor(),
                    aggregate_type="order",
                    aggregate_id="o-2",
                    event_type="OrderPlaced",
                    payload=b'{"total": 20}',
                )

        async def place_async() -> uuid.UUID:
            async with await psycopg.AsyncConnection.connect(outbox.url) as aconn:
                await aconn.execute("INSERT INTO orders VALUES ('o-3', 30)")
                event_id = await add_event(
                    aconn,
                    aggregate_type="order",
                    aggregate_id="o-3",
                    event_type="OrderPlaced",
                    payload=[1, "two"],
                )
                await aconn.commit()
                return event_id

        from_async = asyncio.run(place_async())

        # From SQL, for services not written in Python; and Debezium's insert-then-delete
        # pattern in one transaction still publishes the insert.
        with psycopg.connect(outbox.url) as conn:
            conn.execute("INSERT INTO orders VALUES ('o-4', 40)")
            row = conn.execute(
                "SELECT cdc_relay_add_event('order', 'o-4', 'OrderPlaced', '{\"total\": 40}', "
                '\'{"source": "sql"}\')'
            ).fetchone()
            assert row is not None
            from_sql = row[0]
            conn.execute("DELETE FROM outbox WHERE id = %s", (from_sql,))
            conn.commit()

        end = current_lsn(outbox.url)
        records = consume_all(kafka, [outbox.topic("order")], expected=4, timeout=60, linger=1.0)
        wait_confirmed_past(outbox.url, end)
        assert relay.stop() == 0

    by_id = {(r.header("id") or b"").decode(): r for r in records}
    assert set(by_id) == {str(committed), str(pre_encoded), str(from_async), str(from_sql)}
    assert str(rolled_back) not in by_id
    assert json.loads(by_id[str(committed)].value or b"") == {"total": 10, "items": ["é"]}
    assert by_id[str(committed)].header("trace") == b"t-1"
    assert by_id[str(committed)].key == b"o-1"
    assert json.loads(by_id[str(pre_encoded)].value or b"") == {"total": 20}
    assert json.loads(by_id[str(from_async)].value or b"") == [1, "two"]
    assert by_id[str(from_sql)].header("source") == b"sql"
    assert by_id[str(from_sql)].header("event_type") == b"OrderPlaced"
    assert query(outbox.url, "SELECT id FROM orders ORDER BY id") == [
        ("o-1",),
        ("o-2",),
        ("o-3",),
        ("o-4",),
    ]


def test_an_autocommit_connection_outside_a_transaction_is_refused(outbox: Outbox):
    with psycopg.connect(outbox.url, autocommit=True) as conn:
        with pytest.raises(NotInTransaction, match=r"conn\.transaction"):
            add_event(conn, aggregate_type="order", aggregate_id="o-1", event_type="E", payload={})

        async def refused() -> None:
            async with await psycopg.AsyncConnection.connect(outbox.url, autocommit=True) as a:
                await add_event(
                    a, aggregate_type="order", aggregate_id="o-1", event_type="E", payload={}
                )

        with pytest.raises(NotInTransaction):
            asyncio.run(refused())
    assert query(outbox.url, "SELECT count(*) FROM outbox") == [(0,)]


def test_pre_encoded_bytes_must_be_json_for_a_jsonb_payload(outbox: Outbox):
    with (
        psycopg.connect(outbox.url) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation),
    ):
        add_event(
            conn, aggregate_type="order", aggregate_id="o-1", event_type="E", payload=b"not json"
        )


def test_add_event_follows_a_custom_table_and_column_mapping(db: str):
    execute(db, "CREATE SCHEMA events")
    execute(
        db,
        "CREATE TABLE events.outbox (id text PRIMARY KEY, aggregatetype text, aggregateid text, "
        "type text, payload text)",
    )
    debezium_style = OutboxTable(
        name="events.outbox",
        columns=ColumnMapping(
            aggregate_type="aggregatetype",
            aggregate_id="aggregateid",
            event_type="type",
            headers=None,
            created_at=None,
        ),
    )
    with psycopg.connect(db) as conn:
        event_id = add_event(
            conn,
            aggregate_type="order",
            aggregate_id="o-1",
            event_type="OrderPlaced",
            payload={"a": 1},
            table=debezium_style,
        )
        with pytest.raises(ValueError, match="no headers column"):
            add_event(
                conn,
                aggregate_type="order",
                aggregate_id="o-1",
                event_type="E",
                payload={},
                headers={"x": 1},
                table=debezium_style,
            )
    assert query(db, "SELECT id, aggregatetype, aggregateid, type, payload FROM events.outbox") == [
        (str(event_id), "order", "o-1", "OrderPlaced", '{"a":1}')
    ]
