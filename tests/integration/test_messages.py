"""Events written as logical decoding messages (emit_event, cdc_relay_emit_event) through the
real relay, PostgreSQL and Kafka: what a consumer sees, beside table rows, and what happens to
messages that are not events."""

from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.core.lsn import format_lsn
from cdc_relay.outbox import add_event, emit_event
from tests.integration.conftest import Outbox, make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    current_lsn,
    execute,
    lsn_int,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import ConsumedRecord, consume_all

PREFIX = "cdc_relay.outbox"  # the default CDC_RELAY_MESSAGE_PREFIX


def now_ms(conn: psycopg.Connection) -> int:
    """The transaction's start in ms: what a message event carries as its timestamp."""
    row = conn.execute("SELECT floor(extract(epoch FROM now()) * 1000)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def by_id(records: list[ConsumedRecord]) -> dict[str, ConsumedRecord]:
    return {(r.header("id") or b"").decode(): r for r in records}


@pytest.mark.compat
def test_emitted_events_arrive_byte_exact_and_a_rollback_publishes_nothing(
    outbox: Outbox, kafka: str
):
    raw = bytes(range(256))  # not UTF-8, not JSON: the relay must not care
    with RelayProcess(outbox.env) as relay:
        with psycopg.connect(outbox.url) as conn:
            sync_id = emit_event(
                conn,
                aggregate_type="order",
                aggregate_id="o-1",
                event_type="OrderPlaced",
                payload=raw,
                headers={"trace": "t-1", "n": 7, "nested": {"x": True}, "raw": b"\xfe"},
            )
            sync_ms = now_ms(conn)
            conn.commit()
            rolled_back = emit_event(
                conn, aggregate_type="order", aggregate_id="o-x", event_type="E", payload={}
            )
            conn.rollback()
            conn.execute("BEGIN")
            from_sql = conn.execute(
                "SELECT cdc_relay_emit_event('customer', '客户-9', 'Renamed', "
                """'{"b": 2, "a": [1, 2.50, "é"]}', '{"source": "sql", "n": 10.10}')"""
            ).fetchone()
            from_sql_bytes = conn.execute(
                "SELECT cdc_relay_emit_event_bytes('order', 'o-2', 'Raw', '\\x00ff'::bytea)"
            ).fetchone()
            tombstone = conn.execute(
                "SELECT cdc_relay_emit_event_bytes('order', 'o-2', 'Deleted', NULL)"
            ).fetchone()
            sql_ms = now_ms(conn)
            conn.commit()
        assert from_sql and from_sql_bytes and tombstone

        async def emit_async() -> uuid.UUID:
            async with await psycopg.AsyncConnection.connect(outbox.url) as aconn:
                event_id = await emit_event(
                    aconn,
                    aggregate_type="order",
                    aggregate_id="o-3",
                    event_type="OrderPlaced",
                    payload=[1, "two"],
                )
                await aconn.commit()
                return event_id

        async_id = asyncio.run(emit_async())
        end = current_lsn(outbox.url)
        records = consume_all(
            kafka,
            [outbox.topic("order"), outbox.topic("customer")],
            expected=5,
            timeout=60,
            linger=1.0,
        )
        wait_confirmed_past(outbox.url, end)
        assert relay.stop() == 0

    got = by_id(records)
    ids = [sync_id, async_id, from_sql[0], from_sql_bytes[0], tombstone[0]]
    assert set(got) == {str(i) for i in ids} and len(records) == 5
    assert str(rolled_back) not in got
    first = got[str(sync_id)]
    assert (first.topic, first.key, first.value) == (outbox.topic("order"), b"o-1", raw)
    assert first.headers == [
        ("id", str(sync_id).encode()),
        ("event_type", b"OrderPlaced"),
        ("aggregate_type", b"order"),
        ("trace", b"t-1"),
        ("n", b"7"),
        ("nested", b'{"x":true}'),
        ("raw", b"\xfe"),
    ]
    assert first.timestamp_ms == sync_ms
    assert json.loads(got[str(async_id)].value or b"") == [1, "two"]
    sql = got[str(from_sql[0])]
    # jsonb's text as PostgreSQL prints it, as a jsonb outbox column sends it.
    assert sql.value == '{"a": [1, 2.50, "é"], "b": 2}'.encode()
    assert (sql.topic, sql.key) == (outbox.topic("customer"), "客户-9".encode())
    assert sql.header("source") == b"sql" and sql.header("n") == b"10.10"
    assert sql.timestamp_ms == sql_ms
    assert got[str(from_sql_bytes[0])].value == b"\x00\xff"
    assert got[str(tombstone[0])].value is None


def test_rows_and_messages_of_one_transaction_arrive_in_wal_order(db: str, kafka: str):
    box = make_outbox(db, kafka)
    with RelayProcess(box.env) as relay:
        with psycopg.connect(db) as conn:
            for seq in range(20):
                write = add_event if seq % 2 else emit_event
                write(
                    conn,
                    aggregate_type="order",
                    aggregate_id="o-1",
                    event_type="Step",
                    payload={"seq": seq},
                )
                # Another application's messages, transactional or not: never events.
                conn.execute(
                    "SELECT pg_logical_emit_message(%s, 'someone.else', 'x')", (seq % 3 == 0,)
                )
            conn.commit()
        end = current_lsn(db)
        records = consume_all(kafka, [box.topic("order")], expected=20, timeout=60, linger=1.0)
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
    assert [json.loads(r.value or b"")["seq"] for r in records] == list(range(20))
    assert consume_all(kafka, [box.dead_letter_topic], timeout=5, idle=1) == []


@pytest.mark.parametrize("policy", ["dead-letter", "halt"])
def test_a_non_transactional_message_with_our_prefix_is_not_an_event(
    db: str, kafka: str, policy: str
):
    box = make_outbox(db, kafka, dead_letter_policy=policy)
    with psycopg.connect(db) as conn:
        emit_event(conn, aggregate_type="order", aggregate_id="k", event_type="E", payload=1)
        conn.commit()
    loose = uuid.uuid4()
    content = execute_returning_content(db, loose)
    execute(db, "SELECT pg_logical_emit_message(false, %s, %s::bytea)", (PREFIX, content))
    # The end of the message's WAL record (a non-transactional message is not flushed by
    # itself, so the write position may still be before it).
    after = lsn_int(query(db, "SELECT pg_current_wal_insert_lsn()::text")[0][0])
    with psycopg.connect(db) as conn:
        emit_event(conn, aggregate_type="order", aggregate_id="k", event_type="E", payload=2)
        conn.commit()
    end = current_lsn(db)
    with RelayProcess(box.env) as relay:
        if policy == "dead-letter":
            wait_confirmed_past(db, end)
            assert relay.stop() == 0
        else:
            assert relay.wait(60) == 1
        log = relay.log()
    good = consume_all(kafka, [box.topic("order")], timeout=30, idle=2)
    if policy == "dead-letter":
        assert [r.value for r in good] == [b"1", b"2"]
        (dead,) = consume_all(kafka, [box.dead_letter_topic], expected=1, timeout=30, linger=1)
        assert dead.header("id") == str(loose).encode()
        assert b"not tied to a commit" in (dead.header("error") or b"")
        assert dead.header("source_table") == f"message:{PREFIX}".encode()
        assert dead.value == b"loose"
        # Its own transaction was confirmed past it: a restarted relay does not see it again.
        with psycopg.connect(db) as conn:
            emit_event(conn, aggregate_type="order", aggregate_id="k", event_type="E", payload=3)
            conn.commit()
        later = current_lsn(db)
        with RelayProcess(box.env) as relay:
            wait_confirmed_past(db, later)
            assert relay.stop() == 0
        again = consume_all(kafka, [box.dead_letter_topic], expected=1, timeout=30, linger=2)
        assert len(again) == 1
    else:
        assert [r.value for r in good] == [b"1"]
        errors = [line for line in log.splitlines() if "error" in line.lower()]
        assert any(
            "not tied to a commit" in line and "cdc-relay skip --lsn" in line for line in errors
        )
        assert confirmed_lsn(db) < after, "the slot moved past the halting message"
        assert consume_all(kafka, [box.dead_letter_topic], timeout=5, idle=1) == []
        # The way past it, as for a bad row: skip records its position, the relay then
        # dead-letters exactly that message and delivers what follows.
        (halt,) = [line for line in errors if "cdc-relay skip --lsn" in line]
        position = halt.rsplit("cdc-relay skip --lsn ", 1)[1].strip()
        skipped = cli(box.env, "skip", "--lsn", position)
        assert skipped.returncode == 0, skipped.stderr
        assert str(loose) in skipped.stdout
        with RelayProcess(box.env) as relay:
            wait_confirmed_past(db, end)
            assert relay.stop() == 0
        after_skip = consume_all(kafka, [box.topic("order")], expected=2, timeout=30, linger=1)
        assert [r.value for r in after_skip] == [b"1", b"2"]
        (dead,) = consume_all(kafka, [box.dead_letter_topic], expected=1, timeout=30, linger=1)
        assert dead.header("id") == str(loose).encode()
        assert dead.header("error") == b"skipped by the operator (cdc-relay skip)"


def execute_returning_content(url: str, event_id: uuid.UUID) -> bytes:
    from cdc_relay.core import framing

    return framing.encode(
        event_id=str(event_id),
        aggregate_type="order",
        aggregate_id="k",
        event_type="Loose",
        payload=b"loose",
    )


def test_setup_without_a_table_streams_messages_and_status_shows_the_sources(db: str, kafka: str):
    box = make_outbox(db, kafka, create_table=False, outbox_table="")
    assert query(db, "SELECT to_regclass('public.outbox')") == [(None,)]
    again = cli(box.env, "setup")
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    status = cli(box.env, "status", "--json")
    report = json.loads(status.stdout)
    assert report["sources"] == {
        "tables": [],
        "messages": {"prefix": PREFIX, "functions": "current"},
    }
    assert report["publication"]["tables"] == []
    text = cli(box.env, "status").stdout
    assert f"messages with prefix {PREFIX}: active" in text
    with RelayProcess(box.env) as relay:
        with psycopg.connect(db) as conn:
            ids = [
                emit_event(conn, aggregate_type="order", aggregate_id=f"k-{i}", event_type="E",
                           payload={"i": i})
                for i in range(10)
            ]  # fmt: skip
            conn.commit()
        end = current_lsn(db)
        records = consume_all(kafka, [box.topic("order")], expected=10, timeout=60, linger=0.5)
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
    assert sorted(r.header("id") or b"" for r in records) == sorted(str(i).encode() for i in ids)
    assert len(records) == 10
    # Both sources in status when a table is listed too; one not published says so.
    both = dict(box.env, CDC_RELAY_OUTBOX_TABLE="public.outbox")
    report = json.loads(cli(both, "status", "--json").stdout)
    assert report["sources"]["tables"] == [
        {"table": "public.outbox", "exists": False, "published": False}
    ]
    assert "table public.outbox: NOT ACTIVE" in cli(both, "status").stdout


def test_exactly_once_delivers_message_events_once_in_order(db: str, kafka: str):
    box = make_outbox(db, kafka, delivery="exactly-once", progress_topic=f"p-{uuid.uuid4().hex}")
    with RelayProcess(box.env) as relay:
        with psycopg.connect(db) as conn:
            for seq in range(30):
                write = add_event if seq % 3 == 0 else emit_event
                write(conn, aggregate_type="order", aggregate_id="o-1", event_type="Step",
                      payload={"seq": seq})  # fmt: skip
                if seq % 10 == 9:
                    conn.commit()
        end = current_lsn(db)
        records = consume_all(kafka, [box.topic("order")], expected=30, timeout=90, linger=1.0)
        wait_confirmed_past(db, end, timeout=90)
        assert relay.stop() == 0
    assert [json.loads(r.value or b"")["seq"] for r in records] == list(range(30))
    assert format_lsn(confirmed_lsn(db))  # confirmed past every transaction


def test_a_service_role_without_any_privilege_can_emit_events(pg, db: str, kafka: str):
    box = make_outbox(db, kafka)
    dbname = str(conninfo_to_dict(db)["dbname"])
    role = f"svc_{uuid.uuid4().hex[:8]}"
    execute(db, f"CREATE ROLE {role} LOGIN PASSWORD 'pw-svc'")
    try:
        service = pg.url(user=role, password="pw-svc", dbname=dbname)
        with RelayProcess(box.env) as relay:
            with psycopg.connect(service) as conn:
                from_python = emit_event(
                    conn, aggregate_type="order", aggregate_id="k", event_type="E", payload=1
                )
                row = conn.execute("SELECT cdc_relay_emit_event('order', 'k', 'E', '2')").fetchone()
                conn.commit()
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    add_event(conn, aggregate_type="order", aggregate_id="k", event_type="E",
                              payload=3)  # fmt: skip
            end = current_lsn(db)
            records = consume_all(kafka, [box.topic("order")], expected=2, timeout=60, linger=1)
            wait_confirmed_past(db, end)
            assert relay.stop() == 0
        assert row is not None
        assert [r.header("id") for r in records] == [
            str(from_python).encode(),
            str(row[0]).encode(),
        ]
    finally:
        execute(db, f"DROP OWNED BY {role}")
        execute(db, f"DROP ROLE {role}")
