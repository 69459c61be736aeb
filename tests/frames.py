"""CopyData frames as the walsender sends them (XLogData around pgoutput messages, keepalives),
built from values: for the pipeline's unit and property tests, which need no server.

The layouts are the PostgreSQL documentation's ("Streaming Replication Protocol", "Logical
Replication Message Formats"); tests/unit/test_pgoutput.py checks the decoder against bytes
captured from a real server, so these builders only have to agree with the decoder.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

OUTBOX_RELID = 16384
# The columns of sql/outbox.sql, with their type OIDs (uuid, text, jsonb, timestamptz).
OUTBOX_COLUMNS: tuple[tuple[str, int], ...] = (
    ("id", 2950),
    ("aggregate_type", 25),
    ("aggregate_id", 25),
    ("event_type", 25),
    ("payload", 3802),
    ("headers", 3802),
    ("created_at", 1184),
)


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def xlog_data(message: bytes, lsn: int, wal_end: int | None = None) -> bytes:
    return b"w" + struct.pack(">QQq", lsn, lsn if wal_end is None else wal_end, 0) + message


def keepalive(wal_end: int, *, reply: bool = False) -> bytes:
    return b"k" + struct.pack(">QqB", wal_end, 0, 1 if reply else 0)


def relation(
    relid: int = OUTBOX_RELID,
    namespace: str = "public",
    name: str = "outbox",
    columns: Sequence[tuple[str, int]] = OUTBOX_COLUMNS,
    lsn: int = 0,
) -> bytes:
    body = b"R" + struct.pack(">I", relid) + _cstring(namespace) + _cstring(name) + b"d"
    body += struct.pack(">H", len(columns))
    for column, oid in columns:
        body += b"\0" + _cstring(column) + struct.pack(">Ii", oid, -1)
    return xlog_data(body, lsn)


def begin(final_lsn: int, *, xid: int = 1, commit_time: int = 0, lsn: int = 0) -> bytes:
    return xlog_data(b"B" + struct.pack(">QqI", final_lsn, commit_time, xid), lsn)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return xlog_data(b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, 0), commit_lsn)


def tuple_data(values: Sequence[bytes | None]) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        out += b"n" if value is None else b"t" + struct.pack(">I", len(value)) + value
    return out


def insert(values: Sequence[bytes | None], lsn: int, relid: int = OUTBOX_RELID) -> bytes:
    return xlog_data(b"I" + struct.pack(">I", relid) + b"N" + tuple_data(values), lsn)


def outbox_row(
    key: str,
    payload: bytes = b'{"n": 1}',
    *,
    event_id: str | None = None,
    aggregate_type: str = "order",
    event_type: str = "Tested",
    created_at: bytes | None = b"2026-11-22 12:00:00.123456+00",
) -> list[bytes | None]:
    """The column values of one row of the default outbox table."""
    return [
        (event_id or str(uuid.uuid4())).encode(),
        aggregate_type.encode(),
        key.encode(),
        event_type.encode(),
        payload,
        None,
        created_at,
    ]


def message(
    content: bytes, lsn: int, *, prefix: str = "cdc_relay.outbox", transactional: bool = True
) -> bytes:
    """A pgoutput Message ('M', option messages 'true'): flags, LSN, prefix, content. Its
    XLogData start and the message's own LSN are both ``lsn`` here."""
    body = b"M" + struct.pack(">BQ", 1 if transactional else 0, lsn) + _cstring(prefix)
    return xlog_data(body + struct.pack(">i", len(content)) + content, lsn)


def message_event(
    key: str,
    payload: bytes | None = b'{"n": 1}',
    *,
    event_id: str | None = None,
    aggregate_type: str = "order",
    event_type: str = "Tested",
    headers: Sequence[tuple[str, bytes]] = (),
    timestamp_ms: int = 1_795_000_000_123,
) -> bytes:
    """The content of an event written as a message (core/framing.py)."""
    from cdc_relay.core import framing

    return framing.encode(
        event_id=event_id or str(uuid.uuid4()),
        aggregate_type=aggregate_type,
        aggregate_id=key,
        event_type=event_type,
        payload=payload,
        headers=headers,
        timestamp_ms=timestamp_ms,
    )
