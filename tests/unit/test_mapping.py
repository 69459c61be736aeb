"""Outbox row → Kafka record: payload bytes untouched, headers, topics, and reject verdicts."""

from __future__ import annotations

import pytest

from cdc_relay.core import claimcheck
from cdc_relay.core.mapping import (
    ColumnMapping,
    OutboxRecord,
    Rejected,
    TablePlan,
    dead_letter_record,
    legal_topic,
    parse_timestamp_ms,
)
from cdc_relay.core.pgoutput import UNCHANGED, Column, Oid, Relation
from cdc_relay.errors import MappingError

UUID_OID, TEXT_OID, JSONB_OID, BYTEA_OID, TSTZ_OID = 2950, 25, 3802, 17, 1184

DEFAULT_COLUMNS = [
    ("id", UUID_OID),
    ("aggregate_type", TEXT_OID),
    ("aggregate_id", TEXT_OID),
    ("event_type", TEXT_OID),
    ("payload", JSONB_OID),
    ("headers", JSONB_OID),
    ("created_at", TSTZ_OID),
]
EVENT_ID = b"0b6a3f2e-9f7e-4a53-8d0c-3f9a1f2b7c11"


def relation(columns=DEFAULT_COLUMNS, name="outbox"):
    return Relation(
        xid=None,
        relid=Oid(16384),
        namespace="public",
        name=name,
        replica_identity="d",
        columns=tuple(Column(0, n, Oid(oid), -1) for n, oid in columns),
    )


DEFAULT_MAPPING = ColumnMapping()


def plan(
    columns=DEFAULT_COLUMNS, mapping=DEFAULT_MAPPING, template="outbox.event.{aggregate_type}"
):
    return TablePlan(relation(columns), mapping, template)


def row(**overrides):
    values = {
        "id": EVENT_ID,
        "aggregate_type": b"order",
        "aggregate_id": b"order-42",
        "event_type": b"OrderCreated",
        "payload": b'{"total": 12.50, "items": [1, 2]}',
        "headers": None,
        "created_at": b"2026-11-22 10:38:27.123456+00",
    }
    values.update(overrides)
    return tuple(values[name] for name, _ in DEFAULT_COLUMNS)


def test_maps_a_row_to_topic_key_value_headers_and_timestamp():
    record = plan().map(row())
    assert record == OutboxRecord(
        topic="outbox.event.order",
        key=b"order-42",
        value=b'{"total": 12.50, "items": [1, 2]}',
        headers=[("id", EVENT_ID), ("event_type", b"OrderCreated"), ("aggregate_type", b"order")],
        timestamp_ms=1795343907123,
    )


def test_payload_bytes_pass_through_untouched():
    raw = '{"b": 1,   "a": "é\\u00e9", "n": 1.000}'.encode()
    assert plan().map(row(payload=raw)).value is raw


def test_bytea_payload_is_sent_raw():
    columns = [(n, BYTEA_OID if n == "payload" else oid) for n, oid in DEFAULT_COLUMNS]
    record = plan(columns).map(row(payload=b"\\x00ff10"))
    assert record.value == b"\x00\xff\x10"


def test_text_payload_is_sent_as_utf8():
    columns = [(n, TEXT_OID if n == "payload" else oid) for n, oid in DEFAULT_COLUMNS]
    assert plan(columns).map(row(payload="naïve".encode())).value == "naïve".encode()


def test_headers_column_adds_every_key():
    record = plan().map(row(headers=b'{"trace": "abc", "n": 1, "obj": {"x": [true]}, "s": ""}'))
    assert record.headers[3:] == [
        ("trace", b"abc"),
        ("n", b"1"),
        ("obj", b'{"x":[true]}'),
        ("s", b""),
    ]


def test_header_numbers_keep_the_text_postgresql_printed():
    raw = b'{"n": 10.10, "big": 1.00000000000000000001, "arr": [1.50, {"x": -0}], "i": 7}'
    extra = dict(plan().map(row(headers=raw)).headers[3:])
    assert extra == {
        "n": b"10.10",
        "big": b"1.00000000000000000001",
        "arr": b'[1.50,{"x":-0}]',
        "i": b"7",
    }


@pytest.mark.parametrize("value", [None, UNCHANGED])
def test_null_or_unchanged_headers_add_nothing(value):
    assert len(plan().map(row(headers=value)).headers) == 3


def test_headers_that_are_not_an_object_are_rejected():
    verdict = plan().map(row(headers=b"[1,2]"))
    assert isinstance(verdict, Rejected) and "not a JSON object" in verdict.error
    assert verdict.value == b'{"total": 12.50, "items": [1, 2]}'
    assert verdict.key == b"order-42"


@pytest.mark.parametrize("column", ["id", "aggregate_type", "aggregate_id", "event_type"])
def test_null_routing_or_identity_column_is_rejected(column):
    verdict = plan().map(row(**{column: None}))
    assert isinstance(verdict, Rejected)
    assert "is NULL" in verdict.error


def test_null_payload_is_a_tombstone_like_debezium():
    record = plan().map(row(payload=None))
    assert isinstance(record, OutboxRecord) and record.value is None


def test_illegal_topic_is_rejected_with_the_name():
    verdict = plan().map(row(aggregate_type=b"order lines/v2"))
    assert isinstance(verdict, Rejected)
    assert "invalid topic name 'outbox.event.order lines/v2'" in verdict.error


def test_empty_routing_value_still_makes_a_legal_topic():
    assert plan().map(row(aggregate_type=b"")).topic == "outbox.event."


def test_topic_template_placeholders():
    p = plan(template="{table}.{aggregate_type}.{event_type}")
    assert p.map(row()).topic == "outbox.order.OrderCreated"


def test_non_ascii_key_and_routing_values():
    record = plan().map(row(aggregate_id="客户-7".encode(), aggregate_type="zamówienie".encode()))
    assert isinstance(record, Rejected)  # Kafka topics are ASCII only
    record = plan().map(row(aggregate_id="客户-7".encode()))
    assert record.key == "客户-7".encode()


def test_debezium_style_outbox_without_optional_columns():
    columns = [
        ("id", UUID_OID),
        ("aggregatetype", TEXT_OID),
        ("aggregateid", TEXT_OID),
        ("type", TEXT_OID),
        ("payload", JSONB_OID),
    ]
    mapping = ColumnMapping(
        aggregate_type="aggregatetype", aggregate_id="aggregateid", event_type="type"
    )
    p = TablePlan(relation(columns), mapping, "outbox.event.{aggregate_type}")
    record = p.map((EVENT_ID, b"Customer", b"c-1", b"Created", b"{}"))
    assert record == OutboxRecord(
        "outbox.event.Customer",
        b"c-1",
        b"{}",
        [("id", EVENT_ID), ("event_type", b"Created"), ("aggregate_type", b"Customer")],
        0,
    )


def test_missing_required_column_names_it():
    columns = [c for c in DEFAULT_COLUMNS if c[0] != "event_type"]
    with pytest.raises(MappingError, match="no column 'event_type'"):
        plan(columns)


def test_a_short_row_is_rejected_not_crashed():
    assert isinstance(plan().map((EVENT_ID,)), Rejected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"2026-11-22 10:38:27.123456+00", 1795343907123),
        (b"2026-11-22 12:38:27.5+02", 1795343907500),
        (b"2026-11-22 10:38:27", 1795343907000),  # timestamp without time zone: UTC
        (b"infinity", 0),
        (b"-infinity", 0),
        (b"0044-03-15 00:00:00+00 BC", 0),
    ],
)
def test_parse_timestamp(text, expected):
    assert parse_timestamp_ms(text) == expected


def test_dead_letter_record_carries_the_row_and_the_reason():
    rejected = Rejected("the aggregate id column is NULL", None, b"{}", [("id", EVENT_ID)])
    record = dead_letter_record(
        rejected, topic="dlq", source_lsn="0/16B3748", source_table="public.outbox"
    )
    assert record.topic == "dlq" and record.key is None and record.value == b"{}"
    assert dict(record.headers) == {
        "id": EVENT_ID,
        "error": b"the aggregate id column is NULL",
        "source_lsn": b"0/16B3748",
        "source_table": b"public.outbox",
    }
    assert (
        dead_letter_record(
            rejected, topic="dlq", source_lsn="0/1", source_table="t", include_value=False
        ).value
        is None
    )


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a.b_c-D9", True),
        (".", False),
        ("..", False),
        ("", False),
        ("a" * 249, True),
        ("a" * 250, False),
        ("a/b", False),
        ("é", False),
    ],
)
def test_legal_topic(name, ok):
    assert legal_topic(name) is ok


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"headers": b'{"trace": "t-1", "n": 10.10}'},
        {"headers": UNCHANGED},
        {"created_at": None},
        {"created_at": b"infinity"},
        {"payload": None},
        {"aggregate_id": None},
        {"aggregate_type": b"bad topic"},
    ],
)
def test_the_fast_path_maps_exactly_like_the_general_one(overrides):
    # The first row of a topic takes the general path (it builds the topic); later rows of a
    # known topic take the fast path when they can.
    p = plan()
    p.map(row())
    first = p.map(row(**overrides))
    again = p.map(row(**overrides))
    assert first == again == p._map_general(row(**overrides))


def test_timestamps_follow_created_at_from_row_to_row():
    p = plan()
    stamps = [
        b"2026-11-22 10:38:27.123456+00",
        b"2026-11-22 10:38:27.123456+00",
        b"2026-11-22 10:38:28+00",
        b"",
        b"2026-11-22 10:38:27.123456+00",
    ]
    got = [p.map(row(created_at=s)).timestamp_ms for s in stamps]
    assert got == [1795343907123, 1795343907123, 1795343908000, 0, 1795343907123]


def claim_checked_plan(over: int, columns=DEFAULT_COLUMNS) -> TablePlan:
    return TablePlan(relation(columns), DEFAULT_MAPPING, "outbox.event.{aggregate_type}", over)


@pytest.mark.parametrize("size", [99, 100])
def test_claim_check_leaves_a_payload_up_to_the_threshold_as_it_is(size):
    payload = b'"' + b"x" * (size - 2) + b'"'
    p = claim_checked_plan(100)
    for _ in range(2):  # the hot path (topic known) and the general one (first row)
        record = p.map(row(payload=payload))
        assert record.value is payload
        assert claimcheck.parse_reference(record.value, record.headers) is None


@pytest.mark.parametrize("headers", [None, b'{"tenant": "acme"}'])
def test_claim_check_sends_a_larger_payload_as_a_reference(headers):
    payload = b'"' + b"x" * 99 + b'"'  # 101 bytes
    p = claim_checked_plan(100)
    for _ in range(2):
        record = p.map(row(payload=payload, headers=headers))
        reference = claimcheck.parse_reference(record.value, record.headers)
        assert reference is not None
        assert (reference.event_id, reference.size, reference.table) == (
            EVENT_ID.decode(),
            101,
            "public.outbox",
        )
        assert record.key == b"order-42" and record.topic == "outbox.event.order"
        assert record.headers[:3] == [
            ("id", EVENT_ID),
            ("event_type", b"OrderCreated"),
            ("aggregate_type", b"order"),
        ]
        assert (claimcheck.HEADER, claimcheck.VERSION.encode()) in record.headers
        assert (("tenant", b"acme") in record.headers) == (headers is not None)


def test_claim_check_counts_a_bytea_payload_by_its_decoded_size():
    columns = [(n, BYTEA_OID if n == "payload" else oid) for n, oid in DEFAULT_COLUMNS]
    p = claim_checked_plan(3, columns)
    assert p.map(row(payload=b"\\x00ff10")).value == b"\x00\xff\x10"  # 3 bytes: as it is
    reference = p.map(row(payload=b"\\x00ff1020")).value
    assert reference.startswith(claimcheck.VALUE_PREFIX)


def test_claim_check_refuses_its_header_names_in_the_headers_column():
    verdict = claim_checked_plan(100).map(row(headers=b'{"cdc-relay-claim-check": "v1"}'))
    assert isinstance(verdict, Rejected) and "reserves" in verdict.error
    # Off, the same row is an ordinary one.
    assert plan().map(row(headers=b'{"cdc-relay-claim-check": "v1"}')).value is not None
