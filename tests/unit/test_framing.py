"""The framing of events written as logical decoding messages (core/framing.py) and its reader
on the hot path (core/mapping.py, MessagePlan): fields, headers, byte-exact payloads, and a
verdict, never an exception, for content that is not a version-1 event."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from cdc_relay import outbox, settings
from cdc_relay.core import framing, mapping
from cdc_relay.core.mapping import MessagePlan, OutboxRecord, Rejected

TEMPLATE = "outbox.event.{aggregate_type}"


def plan(template: str = TEMPLATE) -> MessagePlan:
    return MessagePlan("cdc_relay.outbox", template)


def test_the_reader_and_the_writer_agree_on_the_constants():
    assert mapping._FRAME_VERSION == framing.VERSION
    assert mapping._FRAME_NULL_PAYLOAD == framing.FLAG_NULL_PAYLOAD
    assert mapping._FRAME_MIN_SIZE == framing.MIN_SIZE
    assert outbox.DEFAULT_PREFIX == settings.DEFAULT_MESSAGE_PREFIX


def test_version_1_layout_byte_by_byte():
    content = framing.encode(
        event_id="e1",
        aggregate_type="order",
        aggregate_id="o-1",
        event_type="Placed",
        headers=[("trace", b"t-1")],
        payload=b"\xff\x00{}",
        timestamp_ms=1,
    )
    assert content == (
        b"\x01\x00"
        + struct.pack(">q", 1)
        + b"\x00\x02e1\x00\x05order\x00\x03o-1\x00\x06Placed"
        + b"\x00\x01\x00\x05trace\x00\x00\x00\x03t-1"
        + b"\xff\x00{}"
    )


def test_an_event_becomes_a_record_with_the_routing_key_headers_and_timestamp_of_a_row():
    content = framing.encode(
        event_id="e-1",
        aggregate_type="order",
        aggregate_id="客户-9",
        event_type="OrderPlaced",
        headers=[("trace", b"t-1"), ("n", b"7")],
        payload=b'{"b": 2, "a": 1}',
        timestamp_ms=1_795_000_000_123,
    )
    record = plan().map(content)
    assert record == OutboxRecord(
        "outbox.event.order",
        "客户-9".encode(),
        b'{"b": 2, "a": 1}',
        [
            ("id", b"e-1"),
            ("event_type", b"OrderPlaced"),
            ("aggregate_type", b"order"),
            ("trace", b"t-1"),
            ("n", b"7"),
        ],
        1_795_000_000_123,
    )


def test_table_and_schema_placeholders_of_a_message_are_the_prefix_and_message():
    content = framing.encode(
        event_id="e", aggregate_type="order", aggregate_id="k", event_type="T", payload=b"{}"
    )
    record = plan("{schema}.{table}.{event_type}").map(content)
    assert isinstance(record, OutboxRecord) and record.topic == "message.cdc_relay.outbox.T"
    assert plan().table == "message:cdc_relay.outbox"


def test_a_null_payload_is_a_tombstone_and_an_empty_one_is_empty():
    def value(payload: bytes | None) -> bytes | None:
        content = framing.encode(
            event_id="e", aggregate_type="a", aggregate_id="k", event_type="T", payload=payload
        )
        record = plan().map(content)
        assert isinstance(record, OutboxRecord)
        return record.value

    assert value(None) is None
    assert value(b"") == b""


@given(st.binary(max_size=2000), st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=50))))
def test_any_payload_and_headers_come_through_byte_for_byte(payload, headers):
    content = framing.encode(
        event_id="e", aggregate_type="a", aggregate_id="k", event_type="T",
        payload=payload, headers=headers,
    )  # fmt: skip
    record = plan().map(content)
    assert isinstance(record, OutboxRecord)
    assert record.value == payload
    assert record.headers[3:] == headers


@given(st.binary(max_size=300))
def test_random_content_gives_a_record_or_a_verdict_never_an_exception(content):
    assert isinstance(plan().map(content), OutboxRecord | Rejected)


def test_what_is_not_a_version_1_event_is_rejected_with_a_reason():
    good = framing.encode(
        event_id="e-1", aggregate_type="order", aggregate_id="k", event_type="T", payload=b"{}"
    )
    for content, reason in (
        (b"hello", "shorter than any event"),
        (b"\x02" + good[1:], "framing version 2"),
        (good[:1] + b"\x04" + good[2:], "unknown framing flags"),
        (good[:24], "ends inside its fields"),
    ):
        verdict = plan().map(content)
        assert isinstance(verdict, Rejected) and reason in verdict.error, (content, verdict)
    # Routing that Kafka would refuse: a verdict that still carries the event's key and id.
    bad_topic = framing.encode(
        event_id="e-2", aggregate_type="no spaces", aggregate_id="k", event_type="T", payload=b"x"
    )
    verdict = plan().map(bad_topic)
    assert isinstance(verdict, Rejected) and "invalid topic name" in verdict.error
    assert verdict.key == b"k" and ("id", b"e-2") in verdict.headers


def test_a_field_too_long_for_the_framing_is_refused_by_the_writer():
    try:
        framing.encode(
            event_id="e", aggregate_type="a", aggregate_id="k" * 70_000, event_type="T",
            payload=b"",
        )  # fmt: skip
    except ValueError as exc:
        assert "at most 65535" in str(exc)
    else:
        raise AssertionError("no error")
