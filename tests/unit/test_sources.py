"""The pipeline with several sources: logical decoding messages with the relay's prefix beside
table rows, and several outbox tables with their own mappings. Frames in, actions out."""

from __future__ import annotations

import pytest

from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import ColumnMapping, OutboxRecord
from cdc_relay.core.pipeline import (
    NON_TRANSACTIONAL,
    Finish,
    Pipeline,
    PipelineConfig,
    Produce,
    TableSource,
)
from cdc_relay.errors import PrerequisiteError
from tests import frames
from tests.unit.test_pipeline import DLQ, Msg

PREFIX = "cdc_relay.outbox"
BILLING_RELID = 20000
# A Debezium-style table: other names for the roles, no headers, no created_at.
BILLING_COLUMNS = (("id", 25), ("aggregatetype", 25), ("aggregateid", 25), ("type", 25),
                   ("payload", 25))  # fmt: skip
BILLING = ColumnMapping(
    aggregate_type="aggregatetype",
    aggregate_id="aggregateid",
    event_type="type",
    headers=None,
    created_at=None,
)


def pipeline(**config: object) -> Pipeline:
    settings: dict[str, object] = {
        "tables": (TableSource("public", "outbox"), TableSource("billing", "outbox", BILLING)),
        "message_prefix": PREFIX,
        "dead_letter_topic": DLQ,
        "topic_template": "{schema}.{table}.{aggregate_type}",
        **config,
    }
    p = Pipeline(PipelineConfig(**settings), start=Lsn(0x100))  # type: ignore[arg-type]
    p.feed(frames.relation())
    p.feed(frames.relation(BILLING_RELID, "billing", "outbox", BILLING_COLUMNS))
    return p


def test_rows_of_two_tables_and_messages_are_events_of_one_transaction_in_wal_order():
    p = pipeline()
    p.feed(frames.begin(0x2F0, commit_time=1))
    outs = [
        p.feed(frames.insert(frames.outbox_row("k-1", event_id="a"), 0x201)),
        p.feed(frames.message(frames.message_event("k-1", b"\xff", event_id="m"), 0x202)),
        p.feed(frames.insert([b"b", b"invoice", b"i-1", b"Billed", b"{}"], 0x203, BILLING_RELID)),
        p.feed(frames.message(frames.message_event("k-2"), 0x204, prefix="someone.else")),
    ]
    txn = p.delivery
    p.feed(frames.commit(0x2F0, 0x300))
    assert outs[3] is None  # another prefix: not ours
    records = outs[:3]
    assert all(isinstance(r, OutboxRecord) for r in records)
    assert [(r.topic, r.key, r.value) for r in records] == [  # type: ignore[union-attr]
        ("public.outbox.order", b"k-1", b'{"n": 1}'),
        ("message.cdc_relay.outbox.order", b"k-1", b"\xff"),
        ("billing.outbox.invoice", b"i-1", b"{}"),
    ]
    assert [r.headers[0] for r in records] == [("id", b"a"), ("id", b"m"), ("id", b"b")]  # type: ignore[union-attr]
    # One in-flight event each; the slot moves past the transaction after the last ack only.
    assert p.tracker.in_flight_events == 3 and txn is not None
    for r in records[:2]:
        txn(None, Msg(r))  # type: ignore[arg-type]
    assert p.confirmed == 0x100
    txn(None, Msg(records[2]))  # type: ignore[arg-type]
    assert p.confirmed == 0x300
    assert p.stats.published_by_source == {
        "public.outbox": {"public.outbox.order": 1},
        "billing.outbox": {"billing.outbox.invoice": 1},
        "message:cdc_relay.outbox": {"message.cdc_relay.outbox.order": 1},
    }


def test_messages_are_ignored_when_no_prefix_is_configured():
    p = pipeline(message_prefix="")
    p.feed(frames.begin(0x2F0))
    assert p.feed(frames.message(frames.message_event("k"), 0x201)) is None
    p.feed(frames.commit(0x2F0, 0x300))
    assert p.confirmed == 0x300 and p.stats.published == 0


def test_a_message_that_is_not_an_event_is_dead_lettered_like_a_bad_row():
    p = pipeline()
    p.feed(frames.begin(0x2F0))
    actions = p.feed(frames.message(b"not framed", 0x201))
    assert isinstance(actions, list)
    (dead,) = [a for a in actions if type(a) is Produce]
    assert dead.record.topic == DLQ and dead.lsn == 0x201
    headers = dict(dead.record.headers)
    assert b"shorter than any event" in headers["error"]
    assert headers["source_table"] == b"message:cdc_relay.outbox"


def test_a_non_transactional_message_is_dead_lettered_in_a_transaction_of_its_own():
    p = pipeline()
    content = frames.message_event("k-9", b"payload", event_id="nt")
    actions = p.feed(frames.message(content, 0x400, transactional=False))
    assert isinstance(actions, list) and p.delivery is None
    (dead,) = [a for a in actions if type(a) is Produce]
    headers = dict(dead.record.headers)
    assert dead.record.topic == DLQ and headers["error"] == NON_TRANSACTIONAL.encode()
    assert headers["id"] == b"nt" and dead.record.value == b"payload"
    assert p.confirmed == 0x100  # not before the dead letter is acknowledged
    dead.delivery(None, Msg(dead.record))
    assert p.confirmed == 0x400
    assert p.stats.dead_lettered == 1


def test_a_non_transactional_message_halts_under_the_halt_policy_before_its_position():
    p = pipeline(halt_on_bad_row=True)
    one = p.feed(frames.begin(0x2F0))
    assert one is None
    record = p.feed(frames.insert(frames.outbox_row("k"), 0x201))
    assert isinstance(record, OutboxRecord)
    txn = p.delivery
    p.feed(frames.commit(0x2F0, 0x300))
    assert p.feed(frames.message(frames.message_event("k"), 0x400, transactional=False)) == []
    assert txn is not None
    txn(None, Msg(record))
    (finish,) = p.tick(100.0)
    assert isinstance(finish, Finish) and finish.lsn == 0x300 and finish.halt_lsn == 0x400
    assert finish.halt is not None and "not tied to a commit" in finish.halt


def test_a_table_added_to_a_table_listing_publication_stops_the_relay_before_its_rows():
    p = pipeline(unlisted_tables_halt=True)
    p.feed(frames.begin(0x2F0))
    # pgoutput describes a row's partition too when it publishes the row as its root's:
    # a Relation of a table that is no source is not yet a reason to stop; its row is.
    assert p.feed(frames.relation(30000, "public", "newbox")) is None
    with pytest.raises(PrerequisiteError, match=r"public\.newbox, which CDC_RELAY_OUTBOX_TABLE"):
        p.feed(frames.insert(frames.outbox_row("k"), 0x201, 30000))
    # A schema-wide publication carries other tables too: their rows are passed over.
    q = pipeline(unlisted_tables_halt=False)
    q.feed(frames.begin(0x2F0))
    assert q.feed(frames.relation(30000, "public", "newbox")) is None
    assert q.feed(frames.insert(frames.outbox_row("k"), 0x201, 30000)) is None


def test_exactly_once_counts_message_events_like_rows():
    p = pipeline(exactly_once=True)
    p.feed(frames.begin(0x2F0))
    first = p.feed(frames.message(frames.message_event("k"), 0x201))
    second = p.feed(frames.insert(frames.outbox_row("k"), 0x202))
    assert isinstance(first, list) and type(first[0]).__name__ == "BeginTransaction"
    assert isinstance(second, OutboxRecord)
    assert p.kafka is not None
    p.feed(frames.commit(0x2F0, 0x300))
    commit = p.idle(1.0)
    assert commit and commit[0].progress.lsn == 0x300  # type: ignore[union-attr]


def test_exactly_once_dead_letters_a_non_transactional_message_in_a_kafka_transaction():
    p = pipeline(exactly_once=True)
    content = frames.message_event("k", b"v", event_id="nt")
    actions = p.feed(frames.message(content, 0x400, transactional=False))
    assert isinstance(actions, list)
    assert type(actions[0]).__name__ == "BeginTransaction"
    (dead,) = [a for a in actions if type(a) is Produce]
    assert dead.record.topic == DLQ
    dead.delivery(None, Msg(dead.record))
    (commit,) = p.idle(1.0)
    assert commit.progress.lsn == 0x400  # type: ignore[union-attr]
