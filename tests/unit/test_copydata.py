"""CopyData framing of the replication stream ("Streaming Replication Protocol")."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay.core.copydata import (
    PG_EPOCH_UNIX,
    Keepalive,
    XLogData,
    encode_standby_status,
    parse_copy_data,
    pg_time_us,
    unix_seconds,
)
from cdc_relay.core.lsn import Lsn
from cdc_relay.errors import DecodeError

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)


def xlogdata(start: int, wal_end: int, send_time: int, payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQq", start, wal_end, send_time) + payload


def keepalive(wal_end: int, send_time: int, reply: int) -> bytes:
    return b"k" + struct.pack(">QqB", wal_end, send_time, reply)


def test_xlogdata_header_and_payload() -> None:
    frame = xlogdata(0x16B374D848, 0x16B374D900, 757479845678901, b"B\x01\x02")
    msg = parse_copy_data(frame)
    assert isinstance(msg, XLogData)
    assert msg.start_lsn == 0x16B374D848
    assert msg.wal_end == 0x16B374D900
    assert msg.send_time == 757479845678901
    assert isinstance(msg.payload, memoryview)
    assert bytes(msg.payload) == b"B\x01\x02"


def test_xlogdata_payload_is_a_view_without_a_copy() -> None:
    frame = bytearray(xlogdata(1, 2, 3, b"abc"))
    msg = parse_copy_data(memoryview(frame))
    assert isinstance(msg, XLogData)
    frame[-1:] = b"z"
    assert bytes(msg.payload) == b"abz"


def test_xlogdata_with_an_empty_payload_is_framed_fine() -> None:
    msg = parse_copy_data(xlogdata(1, 2, 3, b""))
    assert isinstance(msg, XLogData) and len(msg.payload) == 0


@given(start=U64, wal_end=U64, send_time=I64, payload=st.binary(max_size=100))
def test_xlogdata_round_trip(start: int, wal_end: int, send_time: int, payload: bytes) -> None:
    msg = parse_copy_data(xlogdata(start, wal_end, send_time, payload))
    assert isinstance(msg, XLogData)
    assert (msg.start_lsn, msg.wal_end, msg.send_time) == (start, wal_end, send_time)
    assert bytes(msg.payload) == payload


@pytest.mark.parametrize(("flag", "expected"), [(0, False), (1, True)])
def test_keepalive(flag: int, expected: bool) -> None:
    msg = parse_copy_data(keepalive(0xABCDEF, -5, flag))
    assert msg == Keepalive(Lsn(0xABCDEF), -5, expected)


@given(wal_end=U64, send_time=I64, reply=st.booleans())
def test_keepalive_round_trip(wal_end: int, send_time: int, reply: bool) -> None:
    msg = parse_copy_data(memoryview(keepalive(wal_end, send_time, int(reply))))
    assert msg == Keepalive(Lsn(wal_end), send_time, reply)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "empty CopyData"),
        (b"x" + bytes(24), "unknown CopyData message type b'x'"),
        (b"r" + bytes(33), "unknown CopyData message type b'r'"),  # our own message type
        *((xlogdata(1, 2, 3, b"")[:n], "truncated XLogData header") for n in range(1, 25)),
        *((keepalive(1, 2, 1)[:n], "keepalive of") for n in range(1, 18)),
        (keepalive(1, 2, 1) + b"\x00", "keepalive of 19 bytes"),
    ],
)
def test_malformed_frames_raise_decode_error(frame: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        parse_copy_data(frame)
    assert info.value.offset is not None


@given(frame=st.binary(max_size=40))
def test_random_frames_raise_only_decode_error(frame: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_copy_data(frame)


def test_standby_status_layout_byte_by_byte() -> None:
    out = encode_standby_status(
        written=Lsn(0x0102030405060708),
        flushed=Lsn(0x1112131415161718),
        applied=Lsn(0x2122232425262728),
        now_us=0x3132333435363738,
        reply_requested=True,
    )
    assert len(out) == 34
    assert out == bytes(
        [
            ord("r"),
            *(0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08),  # written
            *(0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18),  # flushed
            *(0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28),  # applied
            *(0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38),  # client time
            0x01,  # reply requested
        ]
    )


def test_standby_status_defaults_to_no_reply_and_takes_negative_times() -> None:
    out = encode_standby_status(written=Lsn(0), flushed=Lsn(0), applied=Lsn(0), now_us=-1)
    assert out == b"r" + bytes(24) + b"\xff" * 8 + b"\x00"


def test_standby_status_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        encode_standby_status(Lsn(0), Lsn(0), Lsn(0), 0)  # type: ignore[call-arg]


@given(written=U64, flushed=U64, applied=U64, now=I64, reply=st.booleans())
def test_standby_status_round_trip(
    written: int, flushed: int, applied: int, now: int, reply: bool
) -> None:
    out = encode_standby_status(
        written=Lsn(written),
        flushed=Lsn(flushed),
        applied=Lsn(applied),
        now_us=now,
        reply_requested=reply,
    )
    assert struct.unpack(">cQQQqB", out) == (b"r", written, flushed, applied, now, int(reply))


def test_pg_epoch() -> None:
    assert datetime.fromtimestamp(PG_EPOCH_UNIX, UTC) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time_us(PG_EPOCH_UNIX) == 0
    assert pg_time_us(PG_EPOCH_UNIX + 1.5) == 1_500_000
    assert pg_time_us(0) == -PG_EPOCH_UNIX * 1_000_000
    assert unix_seconds(0) == PG_EPOCH_UNIX
    assert unix_seconds(-1_000_000) == PG_EPOCH_UNIX - 1


def test_pg_time_matches_a_known_server_timestamp() -> None:
    # 2024-01-02 03:04:05.678901 UTC, as sent in the origin fixture's commit time.
    unix = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC).timestamp()
    assert pg_time_us(unix) == 757479845678901
    assert unix_seconds(757479845678901) == pytest.approx(unix, abs=1e-6)


@given(us=st.integers(-(2**52), 2**52))
def test_pg_time_round_trip_within_float_precision(us: int) -> None:
    # unix_seconds returns a float: around today it resolves ~0.2 µs, so allow 1 µs.
    assert abs(pg_time_us(unix_seconds(us)) - us) <= 1
