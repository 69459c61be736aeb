"""Hostile and unusual outbox rows and schema changes: each has a defined outcome (published,
dead-lettered, or a clear halt), and nothing around it is lost. docs/reliability.md lists
these outcomes; every row of that table is asserted here."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest

from tests.faults import results
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    current_lsn,
    execute,
    insert_events,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import ConsumedRecord, consume_all
from tests.servers import PostgresServer, wait_until

# Every column nullable, so that the bad rows can exist at all.
NULLABLE_OUTBOX = """
CREATE TABLE outbox (
    id uuid, aggregate_type text, aggregate_id text, event_type text,
    payload {payload_type}, headers jsonb, created_at timestamptz DEFAULT now()
)
"""
TEN_MB = 10 * 1024 * 1024
INSERT = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, "
    "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
DEFAULT = object()


@dataclass
class Case:
    """One row; ``outcome`` is "published" (on ``topic_suffix``) or "dead-letter" with an
    error containing ``error``."""

    aggregate_type: str | None = "order"
    aggregate_id: str | None = "k-1"
    event_type: str | None = "Tested"
    payload: str | None = '{"ok": true}'
    headers: str | None = None
    created_at: object = DEFAULT
    outcome: str = "published"
    error: str = ""
    topic_suffix: str = "order"
    null_id: bool = False


CASES: dict[str, Case] = {
    "NULL id": Case(null_id=True, outcome="dead-letter", error="the id column is NULL"),
    "NULL aggregate type": Case(
        aggregate_type=None, outcome="dead-letter", error="the aggregate type column is NULL"
    ),
    "NULL aggregate id": Case(
        aggregate_id=None, outcome="dead-letter", error="the aggregate id column is NULL"
    ),
    "NULL event type": Case(
        event_type=None, outcome="dead-letter", error="the event type column is NULL"
    ),
    "NULL payload": Case(payload=None),  # published with a null value (a tombstone)
    "NULL headers": Case(headers=None),  # published without extra headers
    "NULL created_at": Case(created_at=None),  # published; the producer stamps the time
    "empty aggregate type": Case(aggregate_type="", topic_suffix=""),  # topic "<prefix>."
    "empty aggregate id": Case(aggregate_id=""),  # an empty (not null) key
    "empty event type": Case(event_type=""),
    "empty JSON string payload": Case(payload='""'),
    "non-ASCII key, payload, headers": Case(
        aggregate_id="ключ-🔑-ü", payload='{"text": "日本語 ✓"}', headers='{"note": "é"}'
    ),
    "non-ASCII aggregate type (topic)": Case(
        aggregate_type="заказ", outcome="dead-letter", error="invalid topic name"
    ),
    "topic name over 249 characters": Case(
        aggregate_type="x" * 250, outcome="dead-letter", error="invalid topic name"
    ),
    "topic name with a slash": Case(
        aggregate_type="order/v2", outcome="dead-letter", error="invalid topic name"
    ),
    "headers not a JSON object": Case(
        headers="[1, 2]", outcome="dead-letter", error="not a JSON object"
    ),
    "10 MB payload": Case(
        payload='{"blob": "' + "x" * TEN_MB + '"}',
        outcome="dead-letter",
        error="Message size too large",
    ),
}


def insert_case(url: str, case: Case, event_id: uuid.UUID) -> None:
    created_at = "now" if case.created_at is DEFAULT else case.created_at
    execute(
        url,
        INSERT,
        (
            None if case.null_id else event_id,
            case.aggregate_type,
            case.aggregate_id,
            case.event_type,
            case.payload,
            case.headers,
            created_at,
        ),
    )


def header_or_none(record: ConsumedRecord, name: str) -> bytes | None:
    try:
        return record.header(name)
    except KeyError:
        return None


def test_hostile_rows_each_have_a_defined_outcome_and_nothing_around_them_is_lost(
    db: str, kafka: str
):
    execute(db, NULLABLE_OUTBOX.format(payload_type="jsonb"))
    box = make_outbox(db, kafka, create_table=False)
    ids = {name: uuid.uuid4() for name in CASES}
    seq = 0
    for name, case in CASES.items():
        insert_events(db, count=2, per_txn=2, start=seq)  # good rows around each bad one
        seq += 2
        insert_case(db, case, ids[name])
    insert_events(db, count=2, per_txn=2, start=seq)
    seq += 2
    end = current_lsn(db)
    with RelayProcess(box.env) as relay:
        wait_confirmed_past(db, end, timeout=120)
        assert relay.stop() == 0
        log = relay.log()
    assert "Traceback" not in log

    topics = {box.topic(), box.dead_letter_topic}
    topics |= {box.topic(c.topic_suffix) for c in CASES.values() if c.outcome == "published"}
    published = sum(c.outcome == "published" for c in CASES.values())
    records = consume_all(kafka, sorted(topics), expected=seq + len(CASES), timeout=120, linger=2)
    good = [
        r
        for r in records
        if r.topic == box.topic()
        and header_or_none(r, "event_type") == b"Tested"
        and r.value
        and b'"seq"' in r.value
    ]
    assert sorted(json.loads(r.value or b"")["seq"] for r in good) == list(range(seq))

    by_id = {header_or_none(r, "id"): r for r in records if r not in good}
    dead = [r for r in records if r.topic == box.dead_letter_topic]
    assert len(dead) + published == len(CASES), "every row is in exactly one place"
    outcomes = {}
    for name, case in CASES.items():
        if case.null_id:
            record = next(r for r in dead if header_or_none(r, "id") is None)
        else:
            record = by_id[str(ids[name]).encode()]
        if case.outcome == "published":
            assert record.topic == box.topic(case.topic_suffix), name
            assert record.key == (case.aggregate_id or "").encode(), name
            expected_value = None if case.payload is None else case.payload.encode()
            if expected_value is not None:
                # jsonb's text form (spacing normalised); compare parsed.
                assert json.loads(record.value or b"") == json.loads(expected_value), name
            else:
                assert record.value is None, name
            assert header_or_none(record, "event_type") == (case.event_type or "").encode()
            if case.headers:
                for k, v in json.loads(case.headers).items():
                    assert record.header(k) == v.encode(), name
            outcomes[name] = f"published on {record.topic.replace(box.prefix, '<prefix>')}"
        else:
            assert record.topic == box.dead_letter_topic, name
            assert case.error.encode() in (record.header("error") or b""), name
            if case.payload and len(case.payload) >= TEN_MB:
                assert record.value is None, "too large for Kafka: dead-lettered without it"
            outcomes[name] = "dead-letter: " + (record.header("error") or b"").decode()[:80]
    results.record(
        "hostile rows",
        events=seq + len(CASES),
        faults=f"{len(CASES)} hostile rows among good ones",
        lost=0,
        duplicates=len(records) - seq - len(CASES),
        recovery_s=None,
        notes=f"{published} published, {len(CASES) - published} dead-lettered, as in the "
        "input table",
        outcomes=outcomes,
    )


@pytest.mark.parametrize("payload_type", ["text", "bytea"])
def test_non_json_payload_column_types_are_published_verbatim(
    db: str, kafka: str, payload_type: str
):
    execute(db, NULLABLE_OUTBOX.format(payload_type=payload_type))
    box = make_outbox(db, kafka, create_table=False)
    values: list[bytes] = [b"not json at all", b"", "ünïcödé".encode(), b"\x00\x01\xff"]
    if payload_type == "text":
        values = values[:3]  # text cannot hold NUL
    for i, value in enumerate(values):
        execute(
            db,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (gen_random_uuid(), 'order', %s, 'T', %s)",
            (f"k-{i}", value if payload_type == "bytea" else value.decode()),
        )
    end = current_lsn(db)
    with RelayProcess(box.env) as relay:
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
    records = consume_all(kafka, [box.topic()], expected=len(values), timeout=60, linger=1)
    got = {r.key: r.value for r in records}
    # Kafka keeps an empty value as empty: not a tombstone.
    assert got == {f"k-{i}".encode(): v for i, v in enumerate(values)}


@pytest.mark.compat
def test_add_column_mid_stream_keeps_streaming(db: str, kafka: str):
    box = make_outbox(db, kafka)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=100, per_txn=10)
        wait_confirmed_past(db, end)
        execute(db, "ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'")
        end = insert_events(db, count=100, per_txn=10, start=100)
        execute(db, "ALTER TABLE outbox DROP COLUMN tenant")
        end = insert_events(db, count=100, per_txn=10, start=200)
        wait_confirmed_past(db, end)
        assert relay.running()
        assert relay.stop() == 0
        log = relay.log()
    assert "Traceback" not in log
    records = consume_all(kafka, [box.topic()], expected=300, timeout=60, linger=1)
    assert sorted(json.loads(r.value or b"")["seq"] for r in records) == list(range(300))


def test_dropping_a_mapped_column_mid_stream_halts_before_its_rows(db: str, kafka: str):
    box = make_outbox(db, kafka)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, end)
        execute(db, "ALTER TABLE outbox DROP COLUMN event_type")
        before = current_lsn(db)
        execute(
            db,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, payload) "
            "VALUES (gen_random_uuid(), 'order', 'k', '{}')",
        )
        line = assert_clear_halt(relay.wait(60), relay.log(), "'event_type'")
    assert end <= confirmed_lsn(db) <= before
    record_outcome("mapped column dropped mid-stream", f"halt: {line}")


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("cdc-relay: error:")]


def assert_clear_halt(code: int, log: str, *fragments: str) -> str:
    assert code == 1, log
    assert "Traceback" not in log, log
    lines = error_lines(log)
    assert len(lines) == 1, log
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def delivered_seqs(kafka: str, topic: str) -> list[int]:
    return sorted(
        json.loads(r.value or b"")["seq"] for r in consume_all(kafka, [topic], timeout=30, idle=2)
    )


def test_outbox_renamed_while_running_halts_before_its_rows(db: str, kafka: str):
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, end)
        execute(db, "ALTER TABLE outbox RENAME TO outbox_old")
        before = current_lsn(db)
        insert_events(db, count=50, per_txn=10, start=50, table="outbox_old")
        line = assert_clear_halt(relay.wait(60), relay.log(), "renamed to public.outbox_old")
    assert end <= confirmed_lsn(db) < before + 1, "the slot passed rows of the renamed outbox"
    # Started again, it refuses to stream a publication without the configured table.
    with RelayProcess(box.env) as relay:
        again = assert_clear_halt(relay.wait(60), relay.log(), "does not include public.outbox")
    assert delivered_seqs(kafka, box.topic()) == list(range(50))
    record_outcome("outbox table renamed while running", f"halt: {line}; restart: {again}")


def test_outbox_dropped_while_running_halts_at_the_next_connection(db: str, kafka: str):
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, end)
        execute(db, "DROP TABLE outbox")
        execute(
            db,
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregate_type text NOT NULL, "
            "aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL, "
            "headers jsonb, created_at timestamptz NOT NULL DEFAULT now())",
        )
        # The stream carries nothing about the drop: the relay notices when it reconnects.
        assert relay.running()
        execute(
            db,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE active_pid IS NOT NULL",
        )
        line = assert_clear_halt(relay.wait(60), relay.log(), "does not include public.outbox")
    assert delivered_seqs(kafka, box.topic()) == list(range(50))
    record_outcome(
        "outbox table dropped (and recreated) while running", f"halt at the next connection: {line}"
    )


@pytest.mark.compat
def test_publication_dropped_while_running_halts(db: str, kafka: str):
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, end)
        execute(db, "DROP PUBLICATION cdc_relay")
        before = current_lsn(db)
        insert_events(db, count=50, per_txn=10, start=50)
        line = assert_clear_halt(relay.wait(60), relay.log(), "publication cdc_relay does not")
        assert "reconnecting" in relay.log()  # the walsender's error, then the check
    assert end <= confirmed_lsn(db) <= before, "the slot passed rows it never delivered"
    assert delivered_seqs(kafka, box.topic()) == list(range(50))
    record_outcome("publication dropped while running", f"halt: {line}")


def test_slot_dropped_while_running_halts(db: str, kafka: str):
    box = make_outbox(db, kafka, reconnect_max_backoff_seconds=1)
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=50, per_txn=10)
        wait_confirmed_past(db, end)

        def drop() -> bool:
            execute(
                db,
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE active_pid IS NOT NULL",
            )
            execute(db, "SELECT pg_drop_replication_slot('cdc_relay')")
            return True

        wait_until(drop, 30)
        line = assert_clear_halt(relay.wait(60), relay.log(), "slot cdc_relay does not exist")
    assert delivered_seqs(kafka, box.topic()) == list(range(50))
    record_outcome("replication slot dropped while running", f"halt: {line}")


def test_lost_slot_halts_with_a_clear_message(kafka: str):
    # A server of its own: max_slot_wal_keep_size this small would invalidate other tests'
    # slots on the session server.
    with PostgresServer(settings={"max_slot_wal_keep_size": "1MB"}) as server:
        url = server.create_database("lost")
        box = make_outbox(url, kafka)
        insert_events(url, count=10, per_txn=10)

        def lost() -> bool:
            insert_events(url, count=2_000, per_txn=500, start=10)
            execute(url, "SELECT pg_switch_wal()")
            execute(url, "CHECKPOINT")
            status = query(url, "SELECT wal_status FROM pg_replication_slots")[0][0]
            return status == "lost"

        wait_until(lost, 120, interval=0.1, message="the slot did not become lost")
        with RelayProcess(box.env) as relay:
            line = assert_clear_halt(relay.wait(60), relay.log(), "wal_status = lost")
    record_outcome("slot with wal_status = lost", f"halt: {line}")


OUTCOMES: dict[str, str] = {}


def record_outcome(case: str, outcome: str) -> None:
    OUTCOMES[case] = outcome
    results.record(
        "schema and slot faults",
        events=None,
        faults=f"{len(OUTCOMES)} faults",
        lost=0,
        duplicates=None,
        recovery_s=None,
        notes="each a one-line halt (exit 1) before any undelivered row, as in the input table",
        outcomes=dict(OUTCOMES),
    )
