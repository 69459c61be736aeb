"""Framing of the COPY BOTH stream of a replication connection.

Implements the PostgreSQL documentation, "Streaming Replication Protocol": the XLogData
('w') and Primary keepalive ('k') messages the server sends inside CopyData, and the
Standby status update ('r') the client sends back. Pure: bytes in, values out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

from cdc_relay.core.lsn import Lsn
from cdc_relay.errors import DecodeError

__all__ = [
    "PG_EPOCH_UNIX",
    "Keepalive",
    "XLogData",
    "encode_standby_status",
    "parse_copy_data",
    "pg_time_us",
    "unix_seconds",
]

PG_EPOCH_UNIX: Final = 946684800
"""2000-01-01T00:00:00Z in Unix seconds: PostgreSQL's epoch for protocol timestamps."""

_XLOG_HEADER: Final = struct.Struct(">QQq")  # start LSN, WAL end, send time
_KEEPALIVE: Final = struct.Struct(">QqB")  # WAL end, send time, reply requested
_STATUS: Final = struct.Struct(">cQQQqB")  # 'r', written, flushed, applied, time, reply

XLOG_DATA_HEADER_SIZE: Final = 1 + _XLOG_HEADER.size
KEEPALIVE_SIZE: Final = 1 + _KEEPALIVE.size

XLOG_DATA_TYPE: Final = ord("w")

# mypyc resolves a dataclass field's annotation among the module's globals, where a builtin
# such as memoryview is not: an alias is.
_View: TypeAlias = memoryview
_K: Final = ord("k")


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL data; ``payload`` is one pgoutput message (a view into the CopyData buffer).

    ``start_lsn`` is not a position to confirm, and is 0/0 for some messages (a walsender
    sends Relation messages inside a stream block that way); confirm Commit end LSNs.
    """

    start_lsn: Lsn
    wal_end: Lsn
    send_time: int
    payload: _View


@dataclass(frozen=True, slots=True)
class Keepalive:
    """'k': the server's keepalive; answer at once when ``reply_requested``."""

    wal_end: Lsn
    send_time: int
    reply_requested: bool


def xlog_data_start(frame: bytes | memoryview) -> Lsn:
    """The start LSN of an XLogData frame (at least XLOG_DATA_HEADER_SIZE bytes long)."""
    return Lsn(_XLOG_HEADER.unpack_from(frame, 1)[0])


def parse_copy_data(buf: bytes | memoryview) -> XLogData | Keepalive:
    """Parse one server CopyData message; DecodeError on anything else."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not view:
        raise DecodeError("empty CopyData message", offset=0)
    kind = view[0]
    if kind == XLOG_DATA_TYPE:
        if len(view) < XLOG_DATA_HEADER_SIZE:
            raise DecodeError(
                f"truncated XLogData header ({len(view)} of {XLOG_DATA_HEADER_SIZE} bytes)",
                offset=len(view),
            )
        start, wal_end, send_time = _XLOG_HEADER.unpack_from(view, 1)
        return XLogData(Lsn(start), Lsn(wal_end), send_time, view[XLOG_DATA_HEADER_SIZE:])
    if kind == _K:
        if len(view) != KEEPALIVE_SIZE:
            raise DecodeError(
                f"keepalive of {len(view)} bytes, expected {KEEPALIVE_SIZE}",
                offset=min(len(view), KEEPALIVE_SIZE),
            )
        wal_end, send_time, reply = _KEEPALIVE.unpack_from(view, 1)
        return Keepalive(Lsn(wal_end), send_time, reply != 0)
    raise DecodeError(f"unknown CopyData message type {bytes((kind,))!r}", offset=0)


def encode_standby_status(
    *,
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    now_us: int,
    reply_requested: bool = False,
) -> bytes:
    """The 34-byte Standby status update ('r'); for a logical slot, ``flushed`` is confirmed."""
    return _STATUS.pack(b"r", written, flushed, applied, now_us, 1 if reply_requested else 0)


def pg_time_us(unix_seconds: float) -> int:
    """Unix time in seconds → µs since 2000-01-01, as the protocol carries time."""
    return round(unix_seconds * 1_000_000) - PG_EPOCH_UNIX * 1_000_000


def unix_seconds(pg_us: int) -> float:
    """µs since 2000-01-01 → Unix time in seconds."""
    return pg_us / 1_000_000 + PG_EPOCH_UNIX
