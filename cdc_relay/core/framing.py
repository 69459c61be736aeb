"""The content of an outbox event written as a logical decoding message
(``pg_logical_emit_message(true, prefix, content)``): a compact, versioned binary framing.

The producer side lives here (``encode_head``, ``encode_body``), used by
``cdc_relay.outbox.emit_event``; the SQL function ``cdc_relay_emit_event``
(cdc_relay/sql/emit_event.sql) writes the same bytes. The relay's side is
``cdc_relay.core.mapping.MessagePlan``, on the hot path.

Version 1, big-endian, as pgoutput itself::

    Byte1    version, 1
    Byte1    flags: bit 0 set = the payload is null (a tombstone); other bits must be 0
    Int64    timestamp, milliseconds since 1970-01-01 UTC (the Kafka timestamp; 0 = none)
    String2  event id            (String2 = UInt16 length n, then n bytes of UTF-8)
    String2  aggregate type
    String2  aggregate id        (the Kafka key)
    String2  event type
    UInt16   header count h, then h times: String2 name, UInt32 length m, m bytes of value
    Byte*    the payload: every byte that is left, exactly as the producer gave it

Why this shape: the payload is the tail, so the relay takes it with one slice and never looks
inside (any bytes, not only JSON or UTF-8); everything the relay routes by comes first, with
explicit lengths, so nothing is searched for or unescaped; the version byte lets a later
format coexist (a relay refuses a version it does not know, and dead-letters that event rather
than guess). The timestamp is the producer's transaction start (``now()``), like the default
``created_at`` of a table row.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

VERSION: Final = 1
FLAG_NULL_PAYLOAD: Final = 1
KNOWN_FLAGS: Final = FLAG_NULL_PAYLOAD
MAX_STRING: Final = 0xFFFF
MAX_HEADERS: Final = 0xFFFF
# version + flags + timestamp + 4 empty strings + header count
MIN_SIZE: Final = 1 + 1 + 8 + 4 * 2 + 2

_U16: Final = struct.Struct(">H").pack
_U32: Final = struct.Struct(">I").pack
_I64: Final = struct.Struct(">q").pack


def encode_head(*, null_payload: bool = False) -> bytes:
    """Version and flags: what comes before the timestamp."""
    return bytes((VERSION, FLAG_NULL_PAYLOAD if null_payload else 0))


def encode_timestamp(millis: int) -> bytes:
    return _I64(millis)


def _string2(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes of UTF-8; at most {MAX_STRING} fit")
    return _U16(len(raw)) + raw


def encode_body(
    *,
    event_id: str,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    headers: Iterable[tuple[str, bytes]] = (),
    payload: bytes | None,
) -> bytes:
    """What comes after the timestamp: the four strings, the headers, the payload."""
    parts = [
        _string2(event_id, "the event id"),
        _string2(aggregate_type, "the aggregate type"),
        _string2(aggregate_id, "the aggregate id"),
        _string2(event_type, "the event type"),
    ]
    encoded = [(_string2(name, f"header name {name[:40]!r}"), value) for name, value in headers]
    if len(encoded) > MAX_HEADERS:
        raise ValueError(f"{len(encoded)} headers; at most {MAX_HEADERS} fit")
    parts.append(_U16(len(encoded)))
    for name, value in encoded:
        parts += (name, _U32(len(value)), value)
    parts.append(payload or b"")
    return b"".join(parts)


def encode(
    *,
    event_id: str,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: bytes | None,
    headers: Iterable[tuple[str, bytes]] = (),
    timestamp_ms: int = 0,
) -> bytes:
    """The whole content (tests, tools); ``emit_event`` lets the server fill in the
    timestamp."""
    return (
        encode_head(null_payload=payload is None)
        + encode_timestamp(timestamp_ms)
        + encode_body(
            event_id=event_id,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            event_type=event_type,
            headers=headers,
            payload=payload,
        )
    )
