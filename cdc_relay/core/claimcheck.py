"""Claim-check: the reference the relay publishes instead of a payload that is too large. Pure.

With ``CDC_RELAY_CLAIM_CHECK_OVER_BYTES`` set, an event whose payload (the bytes the relay would
publish as the value) is larger than the threshold goes to its usual topic, with its usual key,
timestamp and headers (``id``, ``event_type``, ``aggregate_type`` and the headers column's
keys), but with a reference instead of the payload. The consumer fetches the payload from the
outbox by event id (cdc_relay.claimcheck). The reference, version 1:

- value: the ASCII prefix ``cdc-relay-claim-check:v1`` and one space, then compact JSON
  ``{"id":"<event id>","size":<payload bytes>,"table":"<schema.table>"}`` (about 120 bytes);
- headers, appended after the usual ones: ``cdc-relay-claim-check`` = ``v1`` (the marker) and
  ``cdc-relay-payload-size`` = the payload's size in bytes, as ASCII digits.

Why both: the marker header lets a consumer tell a reference from an event without touching
the value, and is what ``parse_reference`` goes by. The value is deliberately *not* JSON (it
starts with a letter), so a consumer that knows nothing of claim-check and parses the value as
its event fails loudly at the parse, instead of taking ``{"claim_check": ...}`` for an event
with missing fields. It is never empty or null either: an empty value decodes silently as a
default message in some binary formats, and a null value is a tombstone, which log compaction
would take as "delete this key". The value still says what it is when a tool in between drops
headers. A reference's size never comes from the payload: the relay does not parse payloads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from cdc_relay.core.names import split_table_name
from cdc_relay.errors import MalformedClaimCheck as MalformedClaimCheck

VERSION: Final = "v1"
HEADER: Final = "cdc-relay-claim-check"
SIZE_HEADER: Final = "cdc-relay-payload-size"
VALUE_PREFIX: Final = b"cdc-relay-claim-check:v1 "
# The reason `cdc-relay run` gives for a row it records in cdc_relay_kept when it sent the row
# by reference because Kafka refused it as too large (docs/claim-check.md).
KEPT_REASON: Final = "claim-check: refused by Kafka as too large, published by reference"
# A reference is small; one that is not was not written by the relay.
_MAX_REFERENCE_BYTES: Final = 4096

BYTEA_OID: Final = 17
# Types whose text output depends on no session setting (so a consumer's session gives the
# relay's bytes): text, json, jsonb, varchar, and domains over them.
SETTING_FREE_TEXT_OIDS: Final = frozenset({25, 114, 3802, 1043})
# How the relay turns a payload column into the value (cdc_relay.core.mapping): "raw", the
# bytes of a bytea column; "hex", the hex text (bytea_output = hex, forced on the relay's
# connection) of a domain over bytea, which pgoutput names by the domain's type, not bytea;
# "text", the text output of any other type, in UTF-8.
PayloadForm = Literal["raw", "hex", "text"]

HeaderValue = bytes | str | None
# confluent-kafka's message.headers(): a list of pairs (what a consumer gets), or a dict.
HeadersLike = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]] | None


@dataclass(frozen=True, slots=True)
class ClaimCheck:
    """A parsed reference: the event id, the payload's size in bytes, and the outbox table
    (``schema.table``) the payload is in."""

    event_id: str
    size: int
    table: str


def payload_form(column_type: int, base_type: int) -> PayloadForm | None:
    """How the relay publishes a payload column of type ``column_type`` (an oid; ``base_type``
    is the type under its domains, or the type itself): None when its text depends on session
    settings (dates, floats, ...), so a consumer could not be sure to get the same bytes."""
    if column_type == BYTEA_OID:
        return "raw"
    if base_type == BYTEA_OID:
        return "hex"
    if base_type in SETTING_FREE_TEXT_OIDS:
        return "text"
    return None


def needs_claim_check(payload_size: int, over_bytes: int | None) -> bool:
    """Whether a payload of ``payload_size`` bytes goes by reference: only when claim-check is
    on (``over_bytes`` not None) and the payload is strictly larger than the threshold."""
    return over_bytes is not None and payload_size > over_bytes


def reference_value(event_id: str, size: int, table: str) -> bytes:
    """The value of the reference record (see the module docstring)."""
    if size < 0:
        raise ValueError("a payload size cannot be negative")
    body = json.dumps(
        {"id": event_id, "size": size, "table": table}, ensure_ascii=False, separators=(",", ":")
    )
    return VALUE_PREFIX + body.encode("utf-8")


def reference_headers(size: int) -> list[tuple[str, bytes]]:
    """The headers the relay appends to a reference record, after the usual ones."""
    return [(HEADER, VERSION.encode("ascii")), (SIZE_HEADER, str(size).encode("ascii"))]


def _header(headers: Iterable[tuple[str, HeaderValue]], name: str) -> list[bytes | None]:
    found: list[bytes | None] = []
    for key, value in headers:
        if key == name:
            found.append(value.encode("utf-8") if isinstance(value, str) else value)
    return found


def parse_reference(value: bytes | None, headers: HeadersLike) -> ClaimCheck | None:
    """The reference a consumed record carries, or None for an ordinary record.

    The marker header decides: without it the record is ordinary, whatever its value. With it,
    the value, the size header and the ``id`` header must agree, or MalformedClaimCheck.
    ``headers`` is confluent-kafka's ``message.headers()`` (a list of pairs, or None).
    """
    listed = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    markers = _header(listed, HEADER)
    if not markers:
        return None
    if markers != [VERSION.encode("ascii")]:
        raise MalformedClaimCheck(
            f"header {HEADER} is {markers!r}: this helper reads reference version {VERSION} only"
        )
    if value is None or not value.startswith(VALUE_PREFIX) or len(value) > _MAX_REFERENCE_BYTES:
        raise MalformedClaimCheck()
    try:
        body = json.loads(value[len(VALUE_PREFIX) :])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MalformedClaimCheck() from None
    if not isinstance(body, dict) or set(body) != {"id", "size", "table"}:
        raise MalformedClaimCheck()
    event_id, size, table = body["id"], body["size"], body["table"]
    if not (isinstance(event_id, str) and event_id and isinstance(table, str)):
        raise MalformedClaimCheck()
    if type(size) is not int or size < 0:
        raise MalformedClaimCheck()
    try:
        split_table_name(table)
    except ValueError:
        raise MalformedClaimCheck() from None
    if _header(listed, SIZE_HEADER) != [str(size).encode("ascii")]:
        raise MalformedClaimCheck(
            f"header {SIZE_HEADER} does not match the reference's size ({size} bytes)"
        )
    ids = _header(listed, "id")
    if ids and ids != [event_id.encode("utf-8")]:
        raise MalformedClaimCheck(f"header id does not match the reference's id {event_id!r}")
    return ClaimCheck(event_id=event_id, size=size, table=table)
