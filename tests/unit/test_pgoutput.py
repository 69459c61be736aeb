"""The pgoutput decoder against messages captured from PostgreSQL 15, hand-built bytes for
shapes PostgreSQL 15 cannot send (protocol 4), and fuzzing: whatever the bytes, the decoder
returns a message or raises DecodeError with an offset, nothing else.

Fixtures: tests/fixtures/pgoutput/*.json, made by tests/fixtures/capture_pgoutput.py. Their
"facts" are what the server assigned during the capture (OIDs, xids, names).
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_relay.core.lsn import Lsn, parse_lsn
from cdc_relay.core.pgoutput import (
    UNCHANGED,
    Begin,
    BeginPrepare,
    Binary,
    Column,
    Commit,
    CommitPrepared,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Oid,
    Origin,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Unchanged,
    Update,
    Xid,
    decode,
)
from cdc_relay.errors import DecodeError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pgoutput"
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))

# Built-in type OIDs (pg_type.dat).
BOOL, BYTEA, INT8, INT4, TEXT, VARCHAR, TIMESTAMPTZ, NUMERIC, UUID, JSONB = (
    16,
    17,
    20,
    23,
    25,
    1043,
    1184,
    1700,
    2950,
    3802,
)
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


@cache
def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def raw_messages(name: str) -> list[bytes]:
    return [bytes.fromhex(m["hex"]) for m in fixture(name)["messages"]]


def decoded(name: str) -> list[PgOutputMessage]:
    decoder = Decoder(fixture(name)["proto_version"])
    out = [decoder.decode(raw) for raw in raw_messages(name)]
    assert not decoder.in_stream
    return out


def row_lsns(name: str) -> list[Lsn]:
    return [parse_lsn(m["lsn"]) for m in fixture(name)["messages"]]


def facts(name: str) -> dict[str, Any]:
    result: dict[str, Any] = fixture(name)["facts"]
    return result


def kinds(messages: list[PgOutputMessage]) -> list[type]:
    return [type(m) for m in messages]


def pg_us(text: str) -> int:
    """µs since 2000-01-01 of an ISO timestamp with offset."""
    delta = datetime.fromisoformat(text) - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def columns(rel: Relation) -> list[tuple[str, int, bool, int]]:
    return [(c.name, c.type_oid, c.is_key, c.type_modifier) for c in rel.columns]


def assert_transaction_frame(begin: Begin, commit: Commit, xid: int) -> None:
    assert begin.xid == xid
    assert begin.final_lsn == commit.commit_lsn
    assert commit.end_lsn > commit.commit_lsn
    assert begin.commit_time == commit.commit_time
    assert commit.flags == 0


OUTBOX_COLUMNS = [
    ("id", UUID, True, -1),
    ("aggregate_type", TEXT, False, -1),
    ("aggregate_id", TEXT, False, -1),
    ("event_type", TEXT, False, -1),
    ("payload", JSONB, False, -1),
    ("created_at", TIMESTAMPTZ, False, -1),
    ("trace_id", TEXT, False, -1),
    ("attachment", BYTEA, False, -1),
]


def outbox_row(n: int) -> tuple[bytes | None, ...]:
    """What capture_pgoutput.outbox_row(n) looks like in text format."""
    return (
        f"00000000-0000-4000-8000-{n:012d}".encode(),
        b"order",
        f"order-{n}".encode(),
        b"OrderPlaced",
        f'{{"n": {n}}}'.encode(),
        b"2024-05-06 07:08:09+00",
        f"trace-{n}".encode(),
        None,
    )


# --------------------------------------------------------------------------- all fixtures


def test_fixtures_are_present() -> None:
    assert {
        "insert_outbox",
        "multi_row_txn",
        "update_delete_default",
        "update_delete_full",
        "unchanged_toast",
        "truncate",
        "enum_type",
        "logical_messages",
        "origin",
        "binary",
        "stream_commit",
        "stream_abort",
        "two_phase",
        "stream_prepare",
        "schema_change",
    } <= set(FIXTURE_NAMES)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_decodes_the_same_from_bytes_and_from_a_view_into_a_larger_buffer(
    name: str,
) -> None:
    decoder = Decoder(fixture(name)["proto_version"])
    for raw, expected in zip(raw_messages(name), decoded(name), strict=True):
        frame = b"w" + bytes(24) + raw  # as an XLogData payload arrives
        assert decoder.decode(memoryview(frame)[25:]) == expected


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_decodes_the_same_read_in_place_in_its_frame(name: str) -> None:
    """Bug 10: the relay sliced each payload out of its frame and copied it, then copied every
    column again. It now reads the message in place, after the XLogData header."""
    decoder = Decoder(fixture(name)["proto_version"])
    for raw, expected in zip(raw_messages(name), decoded(name), strict=True):
        frame = b"w" + bytes(24) + raw
        assert decoder.decode(frame, offset=25) == expected


def test_an_error_in_place_counts_its_offset_from_the_message() -> None:
    frame = b"w" + bytes(24) + b"I\x00\x00"
    with pytest.raises(DecodeError) as in_place:
        Decoder().decode(frame, offset=25)
    with pytest.raises(DecodeError) as sliced:
        Decoder().decode(frame[25:])
    assert in_place.value.offset == sliced.value.offset == 1


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_positions_never_go_backwards(name: str) -> None:
    # A walsender sends 0/0 as the start of some Relation messages (see stream_abort).
    lsns = [lsn for lsn in row_lsns(name) if lsn != 0]
    assert lsns == sorted(lsns)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_commit_rows_are_at_the_commit_end_lsn(name: str) -> None:
    for msg, lsn in zip(decoded(name), row_lsns(name), strict=True):
        if isinstance(msg, Commit | StreamCommit | CommitPrepared):
            assert lsn == msg.end_lsn
        if isinstance(msg, RollbackPrepared):
            assert lsn == msg.rollback_end_lsn


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_xid_column_matches_begin(name: str) -> None:
    rows = fixture(name)["messages"]
    for msg, row in zip(decoded(name), rows, strict=True):
        if isinstance(msg, Begin | BeginPrepare) and row["xid"] is not None:
            assert msg.xid == row["xid"]


# --------------------------------------------------------------------------- scenarios


def test_outbox_insert_keeps_text_values_as_the_bytes_sent() -> None:
    msgs = decoded("insert_outbox")
    assert kinds(msgs) == [Begin, Relation, Insert, Commit]
    begin, rel, ins, commit = msgs
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert isinstance(rel, Relation) and isinstance(ins, Insert)
    assert_transaction_frame(begin, commit, facts("insert_outbox")["xids"][0])
    relid = facts("insert_outbox")["relids"]["outbox"]
    assert (rel.xid, rel.relid, rel.namespace, rel.name) == (None, relid, "public", "outbox")
    assert rel.replica_identity == "d"
    assert columns(rel) == OUTBOX_COLUMNS
    assert (ins.xid, ins.relid) == (None, relid)
    assert ins.new == (
        b"7d444840-9dc0-11d1-b245-5ffdce74fad2",
        b"order",
        "ördér-42".encode(),
        b"OrderPlaced",
        # jsonb's text output: keys sorted by length then bytes, numbers kept as written.
        '{"note": "Grüße, 世界 🚀", "total": 12.50, "currency": "EUR"}'.encode(),
        b"2024-05-06 07:08:09.123456+00",
        None,
        b"\\x00ff10",
    )
    assert all(type(v) is bytes or v is None for v in ins.new)


def test_multi_row_transaction_sends_one_relation_per_session() -> None:
    msgs = decoded("multi_row_txn")
    assert kinds(msgs) == [Begin, Relation, Insert, Insert, Insert, Commit, Begin, Insert, Commit]
    xids = facts("multi_row_txn")["xids"]
    b1, c1, b2, c2 = msgs[0], msgs[5], msgs[6], msgs[8]
    assert isinstance(b1, Begin) and isinstance(c1, Commit)
    assert isinstance(b2, Begin) and isinstance(c2, Commit)
    assert_transaction_frame(b1, c1, xids[0])
    assert_transaction_frame(b2, c2, xids[1])
    assert c1.end_lsn <= b2.final_lsn
    inserts = [m for m in msgs if isinstance(m, Insert)]
    assert [i.new for i in inserts] == [outbox_row(n) for n in (1, 2, 3, 4)]
    assert {i.relid for i in inserts} == {facts("multi_row_txn")["relids"]["outbox"]}


def test_default_replica_identity_sends_the_old_key_only_when_the_key_changes() -> None:
    msgs = decoded("update_delete_default")
    assert kinds(msgs) == [Begin, Relation, Insert, Commit] + [Begin, Update, Commit] * 2 + [
        Begin,
        Delete,
        Commit,
    ]
    rel = msgs[1]
    assert isinstance(rel, Relation)
    assert rel.replica_identity == "d"
    assert columns(rel) == [("id", INT4, True, -1), ("owner", TEXT, False, -1),
                            ("balance", NUMERIC, False, (12 << 16 | 2) + 4)]  # fmt: skip
    relid = facts("update_delete_default")["relids"]["account"]
    ins, upd, key_upd, dele = msgs[2], msgs[5], msgs[8], msgs[11]
    assert ins == Insert(None, relid, (b"1", "Zoë".encode(), b"10.00"))
    assert upd == Update(None, relid, None, None, (b"1", "Zoë".encode(), b"12.50"))
    zoe = "Zoë".encode()
    assert key_upd == Update(None, relid, None, (b"1", None, None), (b"2", zoe, b"12.50"))
    assert dele == Delete(None, relid, None, (b"2", None, None))
    begins = [m for m in msgs if isinstance(m, Begin)]
    assert [b.xid for b in begins] == facts("update_delete_default")["xids"]


def test_replica_identity_full_sends_the_whole_old_row() -> None:
    msgs = decoded("update_delete_full")
    rel = msgs[1]
    assert isinstance(rel, Relation)
    assert rel.replica_identity == "f"
    assert all(c.is_key for c in rel.columns)
    relid = facts("update_delete_full")["relids"]["account"]
    zoe = "Zoë".encode()
    assert msgs[5] == Update(None, relid, (b"1", zoe, b"10.00"), None, (b"1", zoe, b"12.50"))
    assert msgs[8] == Update(None, relid, (b"1", zoe, b"12.50"), None, (b"2", zoe, b"12.50"))
    assert msgs[11] == Delete(None, relid, (b"2", zoe, b"12.50"), None)


def test_unchanged_toasted_value_is_the_unchanged_marker() -> None:
    msgs = decoded("unchanged_toast")
    assert kinds(msgs) == [Begin, Relation, Update, Commit]
    upd = msgs[2]
    assert isinstance(upd, Update)
    assert upd.new == (b"1", UNCHANGED, b"2")
    assert upd.new[1] is UNCHANGED
    assert upd.old is None and upd.key is None
    # The body was big enough to live out of line: that is why it is left out.
    assert facts("unchanged_toast")["body_stored_size"] > 2000


def test_truncate_lists_all_relations_and_options() -> None:
    msgs = decoded("truncate")
    assert kinds(msgs) == [
        *(Begin, Relation, Relation, Truncate, Commit),
        *(Begin, Relation, Insert, Commit),
        *(Begin, Relation, Truncate, Commit),
    ]
    relids = facts("truncate")["relids"]
    first, second = msgs[3], msgs[11]
    assert isinstance(first, Truncate) and isinstance(second, Truncate)
    assert first == Truncate(None, (relids["parent"], relids["child"]), 3)
    assert first.cascade and first.restart_identity
    assert second == Truncate(None, (relids["child"],), 0)
    assert not second.cascade and not second.restart_identity


def test_user_defined_type_is_announced_before_its_relation() -> None:
    msgs = decoded("enum_type")
    assert kinds(msgs) == [Begin, Type, Relation, Insert, Commit]
    typ, rel, ins = msgs[1], msgs[2], msgs[3]
    mood = facts("enum_type")["type_oids"]["app.mood"]
    assert typ == Type(None, mood, "app", "mood")
    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name, rel.replica_identity) == ("app", "person", "i")
    assert columns(rel) == [
        ("id", INT4, False, -1),
        ("email", VARCHAR, True, 64 + 4),
        ("mood", mood, False, -1),
        ("score", NUMERIC, False, (5 << 16 | 2) + 4),
    ]
    assert ins == Insert(None, rel.relid, (b"7", b"zoe@example.com", b"happy", b"98.50"))


def test_logical_messages_transactional_inside_and_non_transactional_at_once() -> None:
    msgs = decoded("logical_messages")
    assert kinds(msgs) == [LogicalMessage, Begin, LogicalMessage, Relation, Insert, Commit,
                           LogicalMessage]  # fmt: skip
    nontx, begin, tx, last = msgs[0], msgs[1], msgs[2], msgs[6]
    assert isinstance(nontx, LogicalMessage) and isinstance(tx, LogicalMessage)
    assert isinstance(last, LogicalMessage) and isinstance(begin, Begin)
    assert (nontx.xid, nontx.flags, nontx.transactional) == (None, 0, False)
    assert (nontx.prefix, nontx.content) == ("cdc-relay/nontx", b"\x00\xff\x01")
    assert (tx.flags, tx.transactional, tx.prefix) == (1, True, "cdc-relay/tx")
    assert tx.content == b"in a transaction"
    # Emitted first, sent first: before the Begin of its own transaction.
    assert nontx.lsn < tx.lsn < begin.final_lsn
    # The rolled-back transaction's transactional message is never sent.
    assert (last.transactional, last.prefix, last.content) == (False, "préfixe/ünïcode", b"kept")


def test_origin_follows_begin_and_the_commit_time_is_the_origin_timestamp() -> None:
    msgs = decoded("origin")
    assert kinds(msgs) == [Begin, Origin, Relation, Insert, Commit]
    f = facts("origin")
    begin, origin = msgs[0], msgs[1]
    assert origin == Origin(parse_lsn(f["origin_lsn"]), f["origin"])
    assert isinstance(begin, Begin)
    assert begin.commit_time == pg_us("2024-01-02 03:04:05.678901+00:00")


def test_binary_option_sends_send_format_values() -> None:
    msgs = decoded("binary")
    assert kinds(msgs) == [Begin, Relation, Insert, Commit]
    ins = msgs[2]
    assert isinstance(ins, Insert)
    assert ins.new == (
        Binary(struct.pack(">i", 42)),
        Binary(struct.pack(">q", -2)),
        Binary(b"\x01"),
        Binary("Grüße".encode()),
        Binary(bytes.fromhex("7d4448409dc011d1b2455ffdce74fad2")),
        Binary(struct.pack(">q", 1_000_000)),  # 2000-01-01 00:00:01 UTC
        Binary(b"\x00\x01"),
        None,
    )


def test_streamed_transaction_carries_subtransaction_xids_and_aborts_a_savepoint() -> None:
    msgs = decoded("stream_commit")
    f = facts("stream_commit")
    xid, (sub1, sub2) = f["xids"][0], f["subxids"]
    relid = f["relids"]["bulk"]
    starts = [m for m in msgs if isinstance(m, StreamStart)]
    assert len(starts) >= 3
    assert all(s.xid == xid for s in starts)
    assert [s.first_segment for s in starts] == [True] + [False] * (len(starts) - 1)
    assert len([m for m in msgs if isinstance(m, StreamStop)]) == len(starts)
    inserts = [m for m in msgs if isinstance(m, Insert)]
    assert inserts == [
        Insert(xid, relid, (b"1", b"first")),
        Insert(xid, relid, (b"2", b"second")),
        Insert(sub1, relid, (b"3", b"rolled back")),
        Insert(sub2, relid, (b"4", b"after savepoint")),
    ]
    relations = [m for m in msgs if isinstance(m, Relation)]
    assert relations and all(r.xid in (xid, sub2) for r in relations)
    aborts = [m for m in msgs if isinstance(m, StreamAbort)]
    assert aborts == [StreamAbort(xid, sub1, None, None)]
    last = msgs[-1]
    assert isinstance(last, StreamCommit)
    assert (last.xid, last.flags) == (xid, 0)
    assert last.commit_lsn < last.end_lsn


def test_streamed_transaction_rolled_back_ends_with_stream_abort() -> None:
    msgs = decoded("stream_abort")
    xid = facts("stream_abort")["xids"][0]
    assert fixture("stream_abort")["source"] == "walsender"
    assert isinstance(msgs[0], StreamStart) and msgs[0].first_segment
    assert Insert(xid, facts("stream_abort")["relids"]["bulk"], (b"1", b"doomed")) in msgs
    assert msgs[-1] == StreamAbort(xid, xid, None, None)
    assert isinstance(msgs[-2], StreamStop)


def test_two_phase_commit_and_rollback_prepared() -> None:
    msgs = decoded("two_phase")
    assert kinds(msgs) == [BeginPrepare, Relation, Insert, Prepare, CommitPrepared,
                           BeginPrepare, Insert, Prepare, RollbackPrepared]  # fmt: skip
    f = facts("two_phase")
    x1, x2 = f["xids"]
    g1, g2 = f["gids"]["commit"], f["gids"]["rollback"]
    bp1, p1, cp, bp2, p2, rp = msgs[0], msgs[3], msgs[4], msgs[5], msgs[7], msgs[8]
    assert isinstance(bp1, BeginPrepare) and isinstance(p1, Prepare)
    assert isinstance(cp, CommitPrepared) and isinstance(bp2, BeginPrepare)
    assert isinstance(p2, Prepare) and isinstance(rp, RollbackPrepared)
    assert (bp1.xid, bp1.gid, p1.xid, p1.gid, cp.xid, cp.gid) == (x1, g1, x1, g1, x1, g1)
    assert (bp1.prepare_lsn, bp1.end_lsn, bp1.prepare_time) == (
        p1.prepare_lsn,
        p1.end_lsn,
        p1.prepare_time,
    )
    assert p1.flags == cp.flags == 0
    assert cp.commit_lsn >= p1.end_lsn and cp.end_lsn > cp.commit_lsn
    assert msgs[2] == Insert(None, f["relids"]["outbox"], outbox_row(1))
    assert (bp2.xid, bp2.gid, rp.xid, rp.gid) == (x2, g2, x2, g2)
    assert rp.prepare_end_lsn == p2.end_lsn
    assert rp.prepare_time == p2.prepare_time
    assert rp.rollback_end_lsn > rp.prepare_end_lsn
    assert rp.rollback_time >= rp.prepare_time


def test_streamed_prepared_transaction() -> None:
    msgs = decoded("stream_prepare")
    f = facts("stream_prepare")
    xid, gid = f["xids"][0], f["gids"]["streamed"]
    assert isinstance(msgs[0], StreamStart)
    assert Insert(xid, f["relids"]["bulk"], (b"1", b"prepared")) in msgs
    sp, cp = msgs[-2], msgs[-1]
    assert isinstance(sp, StreamPrepare) and isinstance(cp, CommitPrepared)
    assert (sp.flags, sp.xid, sp.gid) == (0, xid, gid)
    assert sp.prepare_lsn < sp.end_lsn <= cp.commit_lsn < cp.end_lsn
    assert (cp.xid, cp.gid) == (xid, gid)


def test_schema_change_sends_a_new_relation_with_the_added_column() -> None:
    msgs = decoded("schema_change")
    assert kinds(msgs) == [Begin, Relation, Insert, Commit] * 2
    before, after = msgs[1], msgs[5]
    assert isinstance(before, Relation) and isinstance(after, Relation)
    assert before.relid == after.relid
    assert columns(after) == [*OUTBOX_COLUMNS, ("tenant", TEXT, False, -1)]
    assert msgs[6] == Insert(None, after.relid, (*outbox_row(2), b"acme"))


def test_protocol_version_gates_stream_and_two_phase_messages() -> None:
    stream_start = raw_messages("stream_commit")[0]
    begin_prepare = raw_messages("two_phase")[0]
    with pytest.raises(DecodeError, match="protocol version 2"):
        Decoder(1).decode(stream_start)
    with pytest.raises(DecodeError, match="protocol version 3"):
        Decoder(2).decode(begin_prepare)
    assert isinstance(Decoder(3).decode(begin_prepare), BeginPrepare)
    assert isinstance(Decoder(4).decode(stream_start), StreamStart)


def test_module_decode_needs_to_be_told_about_an_open_stream() -> None:
    raws = raw_messages("stream_commit")
    stateful = decoded("stream_commit")
    insert = next(i for i, m in enumerate(stateful) if isinstance(m, Insert))
    assert decode(raws[insert], proto_version=2, in_stream=True) == stateful[insert]


# --------------------------------------------------------------------------- hand-built

XID, SUBXID = Xid(1234), Xid(1240)


def stream_abort_bytes(*extra: int) -> bytes:
    return b"A" + struct.pack(">II", XID, SUBXID) + b"".join(struct.pack(">Q", v) for v in extra)


def test_v4_parallel_stream_abort_carries_abort_lsn_and_time() -> None:
    # PostgreSQL 15 speaks protocol 3 at most, so these bytes are built by hand following
    # "Logical Replication Message Formats" (PostgreSQL 16+): Stream Abort with streaming
    # 'parallel' appends Int64 abort LSN and Int64 abort timestamp.
    raw = stream_abort_bytes(0x0000000100000ABC, 757479845678901)
    assert Decoder(4).decode(raw) == StreamAbort(XID, SUBXID, Lsn(0x100000ABC), 757479845678901)


def test_v4_stream_abort_without_parallel_has_no_abort_fields() -> None:
    assert Decoder(4).decode(stream_abort_bytes()) == StreamAbort(XID, SUBXID, None, None)


@pytest.mark.parametrize(
    ("proto", "raw"),
    [
        (2, stream_abort_bytes(1, 2)),  # the parallel fields do not exist before protocol 4
        (4, stream_abort_bytes(1)),  # half of them
        (4, stream_abort_bytes(1, 2) + b"\x00"),
    ],
)
def test_stream_abort_with_unexpected_length_is_refused(proto: int, raw: bytes) -> None:
    with pytest.raises(DecodeError, match="trailing bytes"):
        Decoder(proto).decode(raw)


def insert_bytes(*values: bytes, xid: int | None = None, relid: int = 16384) -> bytes:
    head = b"I" + (struct.pack(">I", xid) if xid is not None else b"")
    body = b"".join(b"t" + struct.pack(">i", len(v)) + v for v in values)
    return head + struct.pack(">I", relid) + b"N" + struct.pack(">H", len(values)) + body


def test_stream_block_xid_is_read_only_between_stream_start_and_stop() -> None:
    d = Decoder(2)
    assert d.decode(b"S" + struct.pack(">IB", 77, 1)) == StreamStart(Xid(77), True)
    assert d.in_stream
    assert d.decode(insert_bytes(b"x", xid=78)) == Insert(Xid(78), Oid(16384), (b"x",))
    assert d.decode(b"E") == StreamStop()
    assert not d.in_stream
    assert d.decode(insert_bytes(b"x")) == Insert(None, Oid(16384), (b"x",))


def test_stream_start_inside_a_block_and_stop_outside_are_refused() -> None:
    d = Decoder(2)
    with pytest.raises(DecodeError, match="outside a stream block"):
        d.decode(b"E")
    d.decode(b"S" + struct.pack(">IB", 77, 1))
    with pytest.raises(DecodeError, match="inside a stream block"):
        d.decode(b"S" + struct.pack(">IB", 77, 0))
    assert d.in_stream
    d.reset()
    assert not d.in_stream


def test_a_refused_message_leaves_the_stream_state_alone() -> None:
    d = Decoder(2)
    d.decode(b"S" + struct.pack(">IB", 77, 1))
    with pytest.raises(DecodeError, match="trailing"):
        d.decode(b"E\x00")
    assert d.in_stream


@pytest.mark.parametrize(
    ("raw", "match", "offset"),
    [
        (b"", "empty message", 0),
        (b"Z", "unknown message type b'Z'", 0),
        (b"I\x00\x00", "truncated Insert", 1),
        (b"I\x00\x00\x40\x00X\x00\x00", "expected 'N'", 5),
        (b"I\x00\x00\x40\x00N\x00\x01x", "unknown TupleData column kind 0x78", 8),
        (b"I\x00\x00\x40\x00N\x00\x01t\xff\xff\xff\xff", "bad column value length -1", 9),
        (b"I\x00\x00\x40\x00N\x00\x01t\x00\x00\x00\x05ab", "bad column value length 5", 9),
        (b"I\x00\x00\x40\x00N\x00\x01t\x00\x00", "truncated TupleData", 8),
        (b"I\x00\x00\x40\x00N\x00\x02n", "TupleData claims 2 columns in 1 bytes", 6),
        (b"I\x00\x00\x40\x00N\x00\x01n!", "1 trailing bytes after Insert", 9),
        (b"B" + bytes(19), "truncated Begin", 17),
        (b"B" + bytes(21), "trailing bytes after Begin", 21),
        (b"C" + bytes(24), "truncated Commit", 18),
        (b"C" + bytes(26), "trailing bytes after Commit", 26),
        (b"O" + bytes(8) + b"abc", "unterminated string in Origin", 9),
        (b"O" + bytes(8) + b"\xff\xfe\x00", "invalid UTF-8", 9),
        (b"R" + bytes(4) + b"public\x00t\x00x\x00\x00", "unknown replica identity 'x'", 14),
        (b"R" + bytes(4) + b"p\x00t\x00d\x00\x05" + bytes(10), "claims 5 columns", 12),
        (b"U" + bytes(4) + b"X", "Update: expected 'N', got 0x58", 5),
        (b"U" + bytes(4) + b"K\x00\x00O", "Update: expected 'N', got 0x4f", 8),
        (b"D" + bytes(4) + b"N\x00\x00", "Delete: expected 'K' or 'O'", 5),
        (b"T" + struct.pack(">IB", 2, 0) + bytes(4), "claims 2 relations in 4 bytes", 6),
        (b"M" + bytes(9) + b"p\x00" + struct.pack(">i", 3) + b"ab", "content length 3", 12),
        (b"M" + bytes(9) + b"p\x00" + struct.pack(">i", -1), "content length -1", 12),
    ],
)
def test_malformed_input_raises_decode_error_with_its_offset(
    raw: bytes, match: str, offset: int
) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        Decoder(4).decode(raw)
    assert info.value.offset == offset


def test_decode_error_names_the_lsn_when_given() -> None:
    with pytest.raises(DecodeError) as info:
        Decoder().decode(b"Z", lsn=Lsn(0x16B374D848))
    assert info.value.lsn == 0x16B374D848
    assert str(info.value) == "unknown message type b'Z' (lsn 16/B374D848, offset 0)"


def test_decode_error_is_not_chained_to_an_internal_error() -> None:
    with pytest.raises(DecodeError) as info:
        Decoder().decode(b"I\x00")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize("version", [0, 5, -1])
def test_unknown_protocol_version_is_refused(version: int) -> None:
    with pytest.raises(ValueError, match="proto_version"):
        Decoder(version)


def test_tuple_kinds_decode_to_their_value_types() -> None:
    raw = (
        b"I\x00\x00\x40\x00N\x00\x05"
        + b"t\x00\x00\x00\x00"  # empty text is b"", not NULL
        + b"n"
        + b"u"
        + b"b\x00\x00\x00\x02\x00\x01"
        + b"t\x00\x00\x00\x01\x00"
    )
    assert Decoder().decode(raw) == Insert(
        None, Oid(16384), (b"", None, UNCHANGED, Binary(b"\x00\x01"), b"\x00")
    )


def test_unchanged_is_a_singleton_through_copy_and_pickle() -> None:
    assert Unchanged() is UNCHANGED
    assert copy.copy(UNCHANGED) is UNCHANGED
    assert copy.deepcopy(UNCHANGED) is UNCHANGED
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert repr(UNCHANGED) == "UNCHANGED"


def test_flag_properties() -> None:
    assert Column(1, "id", Oid(23), -1).is_key
    assert not Column(0, "id", Oid(23), -1).is_key
    assert LogicalMessage(None, 1, Lsn(1), "p", b"").transactional
    assert not LogicalMessage(None, 0, Lsn(1), "p", b"").transactional


def test_messages_are_frozen() -> None:
    msg = Decoder().decode(insert_bytes(b"x"))
    assert isinstance(msg, Insert)
    with pytest.raises(AttributeError):
        msg.relid = Oid(1)  # type: ignore[misc]


# --------------------------------------------------------------------------- fuzzing

ALL_RAW: list[tuple[str, int, bytes]] = [
    (name, i, raw) for name in FIXTURE_NAMES for i, raw in enumerate(raw_messages(name))
]


def in_stream_for(name: str) -> list[bool]:
    """Whether each message of a fixture sits inside a stream block."""
    state, out = False, []
    for msg in decoded(name):
        if isinstance(msg, StreamStop):
            state = False
        out.append(state)
        if isinstance(msg, StreamStart):
            state = True
    return out


def decode_or_decode_error(raw: bytes, proto: int, in_stream: bool) -> None:
    try:
        decode(raw, proto_version=proto, in_stream=in_stream)
    except DecodeError as exc:
        assert exc.offset is not None
        assert 0 <= exc.offset <= len(raw)
        # The careful re-walk always names the defect the fast TupleData path ran into.
        assert "malformed TupleData" not in str(exc)


def test_every_strict_prefix_of_every_fixture_message_is_refused() -> None:
    for name in FIXTURE_NAMES:
        proto = fixture(name)["proto_version"]
        for raw, in_stream in zip(raw_messages(name), in_stream_for(name), strict=True):
            for cut in range(len(raw)):
                with pytest.raises(DecodeError) as info:
                    decode(raw[:cut], proto_version=proto, in_stream=in_stream)
                assert info.value.offset is not None and info.value.offset <= cut


def test_every_fixture_message_with_a_trailing_byte_is_refused() -> None:
    for name in FIXTURE_NAMES:
        proto = fixture(name)["proto_version"]
        for raw, in_stream in zip(raw_messages(name), in_stream_for(name), strict=True):
            with pytest.raises(DecodeError, match=r"trailing|length|claims"):
                decode(raw + b"\x00", proto_version=proto, in_stream=in_stream)


FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    raw=st.binary(max_size=64),
    proto=st.integers(1, 4),
    in_stream=st.booleans(),
)
def test_random_bytes_raise_only_decode_error(raw: bytes, proto: int, in_stream: bool) -> None:
    decode_or_decode_error(raw, proto, in_stream)


@FUZZ
@given(
    code=st.sampled_from(b"BCORYIUDTMSEcAbPKrp"),
    body=st.binary(max_size=64),
    proto=st.integers(1, 4),
    in_stream=st.booleans(),
)
def test_known_type_byte_with_random_body_raises_only_decode_error(
    code: int, body: bytes, proto: int, in_stream: bool
) -> None:
    decode_or_decode_error(bytes((code,)) + body, proto, in_stream)


@FUZZ
@given(data=st.data(), proto=st.integers(1, 4), in_stream=st.booleans())
def test_mutated_fixture_messages_raise_only_decode_error(
    data: st.DataObject, proto: int, in_stream: bool
) -> None:
    _, _, raw = data.draw(st.sampled_from(ALL_RAW))
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        if data.draw(st.booleans()):
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        else:
            buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    decode_or_decode_error(bytes(buf[:cut]) + data.draw(st.binary(max_size=8)), proto, in_stream)
