"""Rows that can never be delivered: dead-lettered (default) or a clear halt, never skipped."""

from __future__ import annotations

import json
import uuid

import pytest

from cdc_relay.core.lsn import format_lsn, parse_lsn
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    current_lsn,
    execute,
    insert_events,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all

# A nullable outbox, so that the bad rows can exist at all.
NULLABLE_OUTBOX = """
CREATE TABLE outbox (
    id uuid PRIMARY KEY, aggregate_type text, aggregate_id text, event_type text,
    payload jsonb, headers jsonb, created_at timestamptz NOT NULL DEFAULT now()
)
"""
BIG = 2 * 1024 * 1024  # over librdkafka's default message.max.bytes (1 MB)

CASES = {
    "null_aggregate_id": ("order", None, '{"bad": "null key"}', "the aggregate id column is NULL"),
    "illegal_topic": ("order lines/v2", "k-1", '{"bad": "topic"}', "invalid topic name"),
    "too_large": ("order", "k-2", None, "Message size too large"),
    # Headers count towards the record's size too: even the dead-letter record with them is
    # too large, so it is sent with only the identifying headers.
    "huge_headers": ("order", "k-3", '{"bad": "headers"}', "Message size too large"),
}


@pytest.mark.parametrize("policy", [pytest.param("dead-letter", marks=pytest.mark.compat), "halt"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_undeliverable_row(db: str, kafka: str, case: str, policy: str):
    execute(db, NULLABLE_OUTBOX)
    box = make_outbox(db, kafka, create_table=False, dead_letter_policy=policy)
    aggregate_type, aggregate_id, payload, error = CASES[case]
    headers = None
    if payload is None:
        payload = '{"blob": "' + "x" * BIG + '"}'
    if case == "huge_headers":
        headers = '{"blob": "' + "x" * BIG + '"}'

    good_end = insert_events(db, count=5, per_txn=5)  # seq 0-4 before the bad row
    bad_id = uuid.uuid4()
    execute(
        db,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) "
        "VALUES (%s, %s, %s, 'Bad', %s, %s)",
        (bad_id, aggregate_type, aggregate_id, payload, headers),
    )
    bad_end = current_lsn(db)  # the bad row's transaction ends at or before this
    after_end = insert_events(db, count=5, per_txn=5, start=5)  # seq 5-9 after it

    with RelayProcess(box.env) as relay:
        if policy == "dead-letter":
            wait_confirmed_past(db, after_end)
            assert relay.stop() == 0
        else:
            assert relay.wait(60) == 1

    good = consume_all(kafka, [box.topic("order")], timeout=30, idle=2)
    seqs = sorted(json.loads(r.value)["seq"] for r in good if r.value)

    if policy == "dead-letter":
        assert seqs == list(range(10)), "rows around the bad one must all arrive"
        dead = consume_all(kafka, [box.dead_letter_topic], expected=1, timeout=30, linger=1)
        assert len(dead) == 1
        record = dead[0]
        assert record.header("id") == str(bad_id).encode()
        assert error.encode() in (record.header("error") or b"")
        assert record.header("source_table") == b"public.outbox"
        assert b"/" in (record.header("source_lsn") or b"")
        if case == "huge_headers":
            assert record.key is None and record.value is None
            assert [name for name, _ in record.headers] == [
                "id",
                "error",
                "source_lsn",
                "source_table",
            ]
        else:
            assert record.key == (aggregate_id.encode() if aggregate_id else None)
        if case in ("too_large", "huge_headers"):
            assert record.value is None  # too large for Kafka is too large for the DLQ too
        else:
            assert record.value is not None and record.value.startswith(b'{"bad": ')
        assert confirmed_lsn(db) >= after_end
    else:
        assert seqs == list(range(5)), "rows before the bad one are delivered, none after"
        # The relay confirmed what was acked, and stopped before the bad row.
        assert good_end <= confirmed_lsn(db) < bad_end
        assert consume_all(kafka, [box.dead_letter_topic], timeout=3, idle=1) == []


def test_halt_error_is_one_clear_line(db: str, kafka: str):
    execute(db, NULLABLE_OUTBOX)
    box = make_outbox(db, kafka, create_table=False, dead_letter_policy="halt")
    bad_id = uuid.uuid4()
    execute(
        db,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (%s, 'order', NULL, 'Bad', '{}')",
        (bad_id,),
    )
    before = current_lsn(db)
    with RelayProcess(box.env) as relay:
        assert relay.wait(60) == 1
        output = relay.log()
    lines = [line for line in output.splitlines() if line.startswith("cdc-relay: error:")]
    assert len(lines) == 1
    assert str(bad_id) in lines[0] and "halt" in lines[0]
    assert "Traceback" not in output
    assert confirmed_lsn(db) < before


def test_skip_gets_the_relay_past_exactly_the_row_that_halted_it(db: str, kafka: str):
    """Bug 6: a halt had no way out. The bad row is in the WAL, so every restart halted again
    while WAL piled up. `cdc-relay skip --lsn` dead-letters that one event and nothing else."""
    execute(db, NULLABLE_OUTBOX)
    box = make_outbox(db, kafka, create_table=False, dead_letter_policy="halt")
    bad = [uuid.uuid4(), uuid.uuid4()]
    insert_events(db, count=5, per_txn=5)
    add_bad = (
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (%s, 'order', NULL, 'Bad', '{}')"
    )
    execute(db, add_bad, (bad[0],))
    insert_events(db, count=5, per_txn=5, start=5)
    execute(db, add_bad, (bad[1],))

    def halt_line() -> str:
        with RelayProcess(box.env) as relay:
            assert relay.wait(60) == 1
            lines = [x for x in relay.log().splitlines() if x.startswith("cdc-relay: error:")]
        assert len(lines) == 1
        return lines[0]

    first = halt_line()
    assert str(bad[0]) in first
    position = first.rsplit("cdc-relay skip --lsn ", 1)[1].strip()

    gone = cli(box.env, "skip", "--lsn", "0/10")
    assert gone.returncode == 1 and "before the slot's restart position" in gone.stderr
    beside = format_lsn(parse_lsn(position) + 1)
    wrong = cli(box.env, "skip", "--lsn", beside)
    assert wrong.returncode == 1 and f"no insert into public.outbox at {beside}" in wrong.stderr
    done = cli(box.env, "skip", "--lsn", position)
    assert done.returncode == 0, done.stderr
    assert f"event {bad[0]} at {position} will be dead-lettered" in done.stdout

    second = halt_line()  # past the skipped row, the relay halts on the next bad one
    assert str(bad[1]) in second and position not in second

    good = consume_all(kafka, [box.topic("order")], timeout=30, idle=2)
    assert sorted(json.loads(r.value)["seq"] for r in good if r.value) == list(range(10))
    (dead,) = consume_all(kafka, [box.dead_letter_topic], expected=1, timeout=30, linger=1)
    assert dead.header("id") == str(bad[0]).encode()
    assert dead.header("error") == b"skipped by the operator (cdc-relay skip)"
