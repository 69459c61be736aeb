"""The C row path (cdc_relay/adapters/_outbox_rows.c) against the reference: for any Insert
frame, Rows.map() either leaves it to the pure path (None) or gives exactly the record that
Decoder.decode() and TablePlan.map() give. Its produce() shares map()'s code; the publisher's
tests (test_kafka_publisher.py) run it against librdkafka's mock cluster."""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.adapters import native_acks
from cdc_relay.core.mapping import ColumnMapping, OutboxRecord, TablePlan, parse_timestamp_ms
from cdc_relay.core.pgoutput import Decoder, Insert, Relation
from tests import frames

pytestmark = pytest.mark.compiled_core

RELID = frames.OUTBOX_RELID
TEMPLATE = "outbox.event.{aggregate_type}"


def _module() -> ModuleType:
    module, why = native_acks.load()
    assert module is not None, why
    return module


def _relation(columns: list[tuple[str, int]]) -> Relation:
    message = Decoder().decode(frames.relation(columns=columns), offset=25)
    assert type(message) is Relation
    return message


def _tuple_data(values: list[tuple[str, bytes]]) -> bytes:
    """TupleData of (kind, bytes) columns: t and b carry bytes, n and u none."""
    out = struct.pack(">H", len(values))
    for kind, data in values:
        out += kind.encode()
        if kind in "tb":
            out += struct.pack(">I", len(data)) + data
    return out


def _frame(values: list[tuple[str, bytes]], relid: int = RELID) -> bytes:
    return frames.xlog_data(b"I" + struct.pack(">I", relid) + b"N" + _tuple_data(values), 0x100)


def _reference(plan: TablePlan, frame: bytes) -> Any:
    message = Decoder().decode(frame, offset=25)
    assert type(message) is Insert
    outcome = plan.map(message.new)
    if type(outcome) is not OutboxRecord:
        return outcome
    return (outcome.topic, outcome.key, outcome.value, outcome.headers, outcome.timestamp_ms)


def _rows_for(plan: TablePlan, counts: dict[str, int] | None = None) -> Any:
    rows = _module().Rows(None)
    spec = plan.row_spec()
    assert spec is not None
    rows.plan(RELID, spec, {} if counts is None else counts)
    return rows


def _outbox_plan(**kwargs: Any) -> TablePlan:
    return TablePlan(_relation(list(frames.OUTBOX_COLUMNS)), ColumnMapping(), TEMPLATE, **kwargs)


def _row(created_at: bytes = b"2026-11-22 12:00:00.123456+00", **kw: bytes) -> list[Any]:
    values = {
        "id": b"e-1",
        "aggregate_type": b"order",
        "aggregate_id": b"a-1",
        "event_type": b"Placed",
        "payload": b'{"n": 1}',
    } | kw
    return [
        ("t", values["id"]),
        ("t", values["aggregate_type"]),
        ("t", values["aggregate_id"]),
        ("t", values["event_type"]),
        ("t", values["payload"]),
        ("n", b""),
        ("t", created_at),
    ]


def test_a_plain_row_is_taken_once_its_plan_knows_the_topic() -> None:
    plan = _outbox_plan()
    rows = _rows_for(plan)
    frame = _frame(_row())
    assert rows.map(frame) is None  # the topic is the reference path's to work out
    expected = _reference(plan, frame)
    assert rows.map(frame) == expected
    assert rows.map(memoryview(frame)) == expected  # psycopg's frames, read in place
    assert expected[4] == 1_795_348_800_123


def test_produce_without_a_producer_is_an_error_not_a_silent_skip() -> None:
    rows = _rows_for(_outbox_plan())
    with pytest.raises(RuntimeError, match="no producer"):
        rows.produce(_frame(_row()), object())


@pytest.mark.parametrize(
    ("case", "values"),
    [
        ("a NULL aggregate id", [*_row()[:2], ("n", b""), *_row()[3:]]),
        ("a binary payload", [*_row()[:4], ("b", b"x"), *_row()[5:]]),
        ("extra headers", [*_row()[:5], ("t", b'{"a": "b"}'), _row()[6]]),
        ("an unchanged created_at", [*_row()[:6], ("u", b"")]),
        ("a BC timestamp", _row(created_at=b"0044-03-15 12:00:00+00 BC")),
        ("too few columns", _row()[:5]),
    ],
)
def test_what_the_hot_path_does_not_take_is_left_to_the_reference(
    case: str, values: list[tuple[str, bytes]]
) -> None:
    plan = _outbox_plan()
    rows = _rows_for(plan)
    _reference(plan, _frame(_row()))  # the topic is known
    frame = _frame(values)
    taken = rows.map(frame)
    assert taken is None or taken == _reference(plan, frame), case
    if case != "an unchanged created_at":  # a marker in place of a timestamp: Kafka stamps it
        assert taken is None, case


def test_a_payload_over_the_claim_check_bound_is_left_to_the_reference() -> None:
    plan = _outbox_plan(claim_check_over=8)
    rows = _rows_for(plan)
    _reference(plan, _frame(_row()))
    assert rows.map(_frame(_row(payload=b"12345678"))) is not None
    assert rows.map(_frame(_row(payload=b"123456789"))) is None


def test_a_bytea_payload_has_no_row_spec() -> None:
    columns = [(n, 17 if n == "payload" else oid) for n, oid in frames.OUTBOX_COLUMNS]
    assert TablePlan(_relation(columns), ColumnMapping(), TEMPLATE).row_spec() is None


def test_other_frames_unknown_tables_and_malformed_inserts_are_left_alone() -> None:
    plan = _outbox_plan()
    rows = _rows_for(plan)
    frame = _frame(_row())
    _reference(plan, frame)
    assert rows.map(frames.begin(0x200)) is None
    assert rows.map(frames.keepalive(0x200)) is None
    assert rows.map(_frame(_row(), relid=RELID + 1)) is None
    for cut in (1, 5, 30):
        assert rows.map(frame[:-cut]) is None
    assert rows.map(frame + b"\0") is None  # trailing bytes
    assert rows.forget(RELID) is True
    assert rows.map(frame) is None
    assert rows.forget(RELID) is False


def test_a_new_plan_for_a_relid_replaces_the_old_one() -> None:
    rows = _rows_for(_outbox_plan())
    reordered = [frames.OUTBOX_COLUMNS[i] for i in (1, 0, 2, 3, 4, 5, 6)]
    plan = TablePlan(_relation(reordered), ColumnMapping(), TEMPLATE)
    spec = plan.row_spec()
    assert spec is not None
    rows.plan(RELID, spec, {})
    values = _row()
    frame = _frame([values[1], values[0], *values[2:]])
    _reference(plan, frame)
    assert rows.map(frame) == _reference(plan, frame)


# --------------------------------------------------------------------------- properties

_TEXT = st.binary(max_size=12)
# Routing values that make legal topic names, mostly; a topic that is not goes to the reference.
_ROUTING = st.one_of(st.text("abcXYZ019._-", min_size=1, max_size=8).map(str.encode), _TEXT)
_KIND = st.sampled_from("tnub")


@st.composite
def _timestamps(draw: st.DrawFn) -> bytes:
    """Mostly PostgreSQL's ISO output, with every optional part; sometimes near misses."""
    year = draw(st.integers(0, 10_000))
    month, day = draw(st.integers(0, 13)), draw(st.integers(0, 32))
    hour, minute, second = (
        draw(st.integers(0, 24)),
        draw(st.integers(0, 60)),
        draw(st.integers(0, 60)),
    )
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
    digits = draw(st.integers(0, 7))
    if digits:
        text += "." + "".join(
            draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits))
        )
    offset = draw(st.sampled_from(["", "+HH", "-HH", "+HH:MM", "-HH:MM:SS", "Z", " BC"]))
    offset = offset.replace("HH", f"{draw(st.integers(0, 25)):02d}")
    offset = offset.replace("MM", f"{draw(st.integers(0, 61)):02d}")
    text += offset.replace("SS", f"{draw(st.integers(0, 61)):02d}")
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(_timestamps())
def test_created_at_gives_the_reference_milliseconds_or_is_left_to_it(text: bytes) -> None:
    plan = _outbox_plan()
    rows = _rows_for(plan)
    _reference(plan, _frame(_row()))
    taken = rows.map(_frame(_row(created_at=text)))
    assert taken is None or taken[4] == parse_timestamp_ms(text)


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[tuple[str, int]], list[list[tuple[str, bytes]]]]:
    """A table with the outbox columns in any order among others, and rows of any kinds: half
    of them plain (routing columns text, no headers), sharing routing values and timestamps."""
    names = [name for name, _ in frames.OUTBOX_COLUMNS]
    extra = draw(st.integers(0, 3))
    layout = draw(st.permutations([*names, *(f"x{i}" for i in range(extra))]))
    oids = dict(frames.OUTBOX_COLUMNS)
    columns = [(name, oids.get(name, 25)) for name in layout]
    common = draw(st.lists(_ROUTING, min_size=1, max_size=3))
    stamps = draw(st.lists(_timestamps(), min_size=1, max_size=2))
    any_value = st.one_of(st.sampled_from(common), _TEXT, _timestamps())
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        plain = draw(st.booleans())
        row = []
        for name in layout:
            if plain and name in names[:5]:
                row.append(("t", draw(st.sampled_from(common))))
            elif plain and name == "headers":
                row.append(("n", b""))
            elif plain and name == "created_at":
                row.append((draw(st.sampled_from("tttn")), draw(st.sampled_from(stamps))))
            else:
                row.append((draw(st.sampled_from("tttnub")), draw(any_value)))
        rows.append(row)
    return columns, rows


@settings(max_examples=300, deadline=None)
@given(_tables())
def test_every_row_is_the_reference_record_or_left_to_the_reference(
    table: tuple[list[tuple[str, int]], list[list[tuple[str, bytes]]]],
) -> None:
    columns, rows_values = table
    plan = TablePlan(_relation(columns), ColumnMapping(), "t.{aggregate_type}.{event_type}")
    counts: dict[str, int] = {}
    rows = _rows_for(plan, counts)
    for values in rows_values:
        frame = _frame(values)
        taken = rows.map(frame)
        expected = _reference(plan, frame)  # also teaches the plan the row's topic
        assert taken is None or taken == expected
        again = rows.map(frame)
        assert again is None or again == expected
    assert counts == {}  # map() counts nothing: only produce() does
