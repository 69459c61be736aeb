"""Outbox row → Kafka record: pure, the hot path's per-event work.

A TablePlan is bound to one version of an outbox table's Relation message (column positions
are resolved once); `TablePlan.map` then turns an Insert's tuple into an OutboxRecord, or into a
Rejected verdict when the row can never be delivered (it then goes to the dead-letter topic or
halts the relay, per policy). A MessagePlan does the same for the content of a logical decoding
message in the framing of core/framing.py. The payload bytes are passed through exactly as
PostgreSQL sent them: never parsed, never re-encoded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FunctionType
from typing import Final

from cdc_relay.core import claimcheck
from cdc_relay.core.pgoutput import ColumnValue, Relation
from cdc_relay.errors import MappingError

BYTEA_OID: Final = 17


def _probe() -> None:
    """Never called: its type tells whether this module runs compiled."""


# Whether this module was compiled by mypyc (see pgoutput.py, which does the same).
_COMPILED: Final = not isinstance(_probe, FunctionType)
_setattr: Final = object.__setattr__

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_LEGAL_TOPIC: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_TOPIC_CACHE_LIMIT: Final = 10_000
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

Headers = list[tuple[str, bytes]]
# TablePlan.row_spec(): (width, id, aggregate_type, aggregate_id, event_type, payload, headers,
# created_at, claim_check_over, topics).
RowSpec = tuple[int, int, int, int, int, int, int, int, int, dict[tuple[bytes, bytes], str]]


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """Which outbox column plays which role; headers and created_at are optional."""

    id: str = "id"
    aggregate_type: str = "aggregate_type"
    aggregate_id: str = "aggregate_id"
    event_type: str = "event_type"
    payload: str = "payload"
    headers: str | None = "headers"
    created_at: str | None = "created_at"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.id, self.aggregate_type, self.aggregate_id, self.event_type, self.payload)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One Kafka record, ready for produce(). timestamp_ms 0 means "let Kafka stamp it"."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    def __init__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        timestamp_ms: int,
    ) -> None:
        # Written out, where dataclass would generate it: compiled, the generated __init__ of a
        # frozen dataclass stays interpreted code (15 times slower than this one, which stores
        # the fields natively); interpreted, this does what the generated one does (and the
        # hot path does not call it: see TablePlan.map).
        if _COMPILED:
            self.topic = topic  # type: ignore[misc]
            self.key = key  # type: ignore[misc]
            self.value = value  # type: ignore[misc]
            self.headers = headers  # type: ignore[misc]
            self.timestamp_ms = timestamp_ms  # type: ignore[misc]
        else:
            _setattr(self, "topic", topic)
            _setattr(self, "key", key)
            _setattr(self, "value", value)
            _setattr(self, "headers", headers)
            _setattr(self, "timestamp_ms", timestamp_ms)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row that cannot be delivered, with what is known of it for the dead-letter record."""

    error: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def legal_topic(name: str) -> bool:
    return bool(_LEGAL_TOPIC.match(name)) and name not in (".", "..")


# Interpreted, a frozen dataclass's __init__ sets each field through object.__setattr__ (~0.8 µs
# for five); the hot path builds OutboxRecord through the slots' descriptors: still frozen,
# equal to one built by __init__, at half the cost. (Compiled, a native class has no such
# descriptors, and needs none: its __init__ is a C function.)
if not _COMPILED:
    _new = object.__new__
    _SET_TOPIC = vars(OutboxRecord)["topic"].__set__
    _SET_KEY = vars(OutboxRecord)["key"].__set__
    _SET_VALUE = vars(OutboxRecord)["value"].__set__
    _SET_HEADERS = vars(OutboxRecord)["headers"].__set__
    _SET_TIMESTAMP = vars(OutboxRecord)["timestamp_ms"].__set__


NO_CLAIM_CHECK: Final = 1 << 62  # no payload is that large: claim-check off
_CLAIM_CHECK_HEADERS: Final = frozenset({claimcheck.HEADER, claimcheck.SIZE_HEADER})


class TablePlan:
    """Column positions of one Relation version and the per-row mapping."""

    __slots__ = (
        "_claim_check_over",
        "_created_at_idx",
        "_event_type_idx",
        "_headers_idx",
        "_id_idx",
        "_key_idx",
        "_last_aggregate_type",
        "_last_created_at",
        "_last_event_type",
        "_last_timestamp_ms",
        "_last_topic",
        "_payload_idx",
        "_payload_is_bytea",
        "_schema",
        "_table",
        "_template",
        "_topics",
        "_type_idx",
        "_width",
        "table",
    )

    def __init__(
        self,
        relation: Relation,
        mapping: ColumnMapping,
        topic_template: str,
        claim_check_over: int | None = None,
    ) -> None:
        # Claim-check (CDC_RELAY_CLAIM_CHECK_OVER_BYTES): a payload larger than this goes as a
        # reference (core/claimcheck.py); off, a bound no payload reaches, so that the hot path
        # pays one integer comparison.
        self._claim_check_over = NO_CLAIM_CHECK if claim_check_over is None else claim_check_over
        positions = {column.name: i for i, column in enumerate(relation.columns)}
        missing = [name for name in mapping.required if name not in positions]
        if missing:
            raise MappingError(
                f"outbox table {relation.namespace}.{relation.name} has no column "
                + ", ".join(repr(name) for name in missing)
                + " (check the CDC_RELAY_COLUMN_* settings)"
            )
        self.table = f"{relation.namespace}.{relation.name}"
        self._table = relation.name
        self._schema = relation.namespace
        self._id_idx = positions[mapping.id]
        self._type_idx = positions[mapping.aggregate_type]
        self._key_idx = positions[mapping.aggregate_id]
        self._event_type_idx = positions[mapping.event_type]
        self._payload_idx = positions[mapping.payload]
        self._payload_is_bytea = relation.columns[self._payload_idx].type_oid == BYTEA_OID
        # Optional columns that the table lacks are simply not used (a Debezium-style outbox
        # has neither), so the payload index is kept apart from them.
        self._headers_idx = positions.get(mapping.headers) if mapping.headers else None
        self._created_at_idx = positions.get(mapping.created_at) if mapping.created_at else None
        self._template = topic_template
        self._topics: dict[tuple[bytes, bytes], str] = {}
        self._last_created_at = b""
        self._last_timestamp_ms = 0  # what parse_timestamp_ms(b"") gives
        # The last row's routing columns and topic: rows in a row mostly share them, and two
        # bytes comparisons cost less than the cache key's tuple and hashes.
        self._last_aggregate_type: bytes | None = None
        self._last_event_type: bytes | None = None
        self._last_topic = ""
        used = [
            self._id_idx,
            self._type_idx,
            self._key_idx,
            self._event_type_idx,
            self._payload_idx,
            self._headers_idx,
            self._created_at_idx,
        ]
        self._width = 1 + max(i for i in used if i is not None)

    def row_spec(self) -> RowSpec | None:
        """What the C row path (adapters/_outbox_rows.c) needs to do ``map``'s hot path over
        an Insert's bytes: the row's width, the indexes of id, aggregate type, aggregate id,
        event type, payload, headers and created_at (-1: none), the claim-check bound, and
        this plan's topic cache, which it reads and ``map`` fills. None when no row of this
        table takes the hot path (a bytea payload)."""
        if self._payload_is_bytea:
            return None
        return (
            self._width,
            self._id_idx,
            self._type_idx,
            self._key_idx,
            self._event_type_idx,
            self._payload_idx,
            -1 if self._headers_idx is None else self._headers_idx,
            -1 if self._created_at_idx is None else self._created_at_idx,
            self._claim_check_over,
            self._topics,
        )

    def map(self, values: tuple[ColumnValue, ...]) -> OutboxRecord | Rejected:
        """Turn one inserted row into a record, or a Rejected verdict. Never raises."""
        if len(values) < self._width:
            return Rejected("the row has fewer columns than its relation", None, None, [])
        # The hot path: every routing column present, a text payload, a known topic, no
        # extra headers; anything else takes the general path below.
        event_id = values[self._id_idx]
        aggregate_type = values[self._type_idx]
        key = values[self._key_idx]
        event_type = values[self._event_type_idx]
        value = values[self._payload_idx]
        if (
            type(event_id) is bytes
            and type(aggregate_type) is bytes
            and type(key) is bytes
            and type(event_type) is bytes
            and type(value) is bytes
            and not self._payload_is_bytea
            and (self._headers_idx is None or values[self._headers_idx] is None)
            and len(value) <= self._claim_check_over
        ):
            topic: str | None
            if aggregate_type == self._last_aggregate_type and event_type == self._last_event_type:
                topic = self._last_topic
            else:
                topic = self._topics.get((aggregate_type, event_type))
                if topic is not None:
                    self._last_aggregate_type = aggregate_type
                    self._last_event_type = event_type
                    self._last_topic = topic
            if topic is not None:
                timestamp_ms = 0
                if self._created_at_idx is not None:
                    created_at = values[self._created_at_idx]
                    # Events of one transaction share created_at (now() is the transaction's
                    # start): parse each distinct text once.
                    if type(created_at) is bytes:
                        if created_at == self._last_created_at:
                            timestamp_ms = self._last_timestamp_ms
                        else:
                            timestamp_ms = parse_timestamp_ms(created_at)
                            self._last_created_at = created_at
                            self._last_timestamp_ms = timestamp_ms
                headers = [
                    ("id", event_id),
                    ("event_type", event_type),
                    ("aggregate_type", aggregate_type),
                ]
                if _COMPILED:
                    return OutboxRecord(topic, key, value, headers, timestamp_ms)
                record = _new(OutboxRecord)
                _SET_TOPIC(record, topic)
                _SET_KEY(record, key)
                _SET_VALUE(record, value)
                _SET_HEADERS(record, headers)
                _SET_TIMESTAMP(record, timestamp_ms)
                return record
        return self._map_general(values)

    def _map_general(self, values: tuple[ColumnValue, ...]) -> OutboxRecord | Rejected:
        event_id = values[self._id_idx]
        aggregate_type = values[self._type_idx]
        key = values[self._key_idx]
        event_type = values[self._event_type_idx]
        value = self._payload(values[self._payload_idx])

        headers: Headers = []
        if type(event_id) is bytes:
            headers.append(("id", event_id))
        if type(event_type) is bytes:
            headers.append(("event_type", event_type))
        if type(aggregate_type) is bytes:
            headers.append(("aggregate_type", aggregate_type))
        key_bytes = key if type(key) is bytes else None

        if isinstance(value, Rejected):
            return Rejected(value.error, key_bytes, None, headers)
        if not (
            type(event_id) is bytes
            and type(aggregate_type) is bytes
            and key_bytes is not None
            and type(event_type) is bytes
        ):
            # Off the hot path: find which column to name.
            for role, item in (
                ("id", event_id),
                ("aggregate type", aggregate_type),
                ("aggregate id", key),
                ("event type", event_type),
            ):
                if type(item) is not bytes:
                    return Rejected(f"the {role} column is NULL", key_bytes, value, headers)
        assert type(aggregate_type) is bytes and type(event_type) is bytes  # for mypy
        assert type(event_id) is bytes
        topic = self._topics.get((aggregate_type, event_type))
        if topic is None:
            topic_or_error = self._topic(aggregate_type, event_type)
            if isinstance(topic_or_error, Rejected):
                return Rejected(topic_or_error.error, key_bytes, value, headers)
            topic = topic_or_error

        if self._headers_idx is not None:
            extra = self._extra_headers(values[self._headers_idx])
            if isinstance(extra, Rejected):
                return Rejected(extra.error, key_bytes, value, headers)
            headers.extend(extra)

        if self._claim_check_over != NO_CLAIM_CHECK:
            reserved = [name for name, _ in headers if name in _CLAIM_CHECK_HEADERS]
            if reserved:
                return Rejected(
                    f"the headers column uses {reserved[0]!r}, a header name claim-check reserves",
                    key_bytes,
                    value,
                    headers,
                )
            if value is not None and len(value) > self._claim_check_over:
                # By reference: the payload stays in the outbox row, the consumer fetches it
                # by event id (cdc_relay.claimcheck); prune keeps the row for the retention.
                size = len(value)
                headers.extend(claimcheck.reference_headers(size))
                value = claimcheck.reference_value(event_id.decode(), size, self.table)

        timestamp_ms = 0
        if self._created_at_idx is not None:
            timestamp_ms = self._timestamp_ms(values[self._created_at_idx])
        return OutboxRecord(topic, key_bytes, value, headers, timestamp_ms)

    def _payload(self, raw: ColumnValue) -> bytes | Rejected | None:
        if raw is None:
            # Like Debezium's router: a NULL payload is published as a null value (a tombstone).
            return None
        if type(raw) is not bytes:
            return Rejected("the payload column is not in text format", None, None, [])
        if self._payload_is_bytea:
            # bytea's text output is \x followed by hex (bytea_output = hex, forced on connect).
            if raw[:2] != b"\\x":
                return Rejected("the bytea payload is not in hex format", None, None, [])
            try:
                return bytes.fromhex(raw[2:].decode("ascii"))
            except ValueError:
                return Rejected("the bytea payload is not valid hex", None, None, [])
        return raw

    def _topic(self, aggregate_type: bytes, event_type: bytes) -> str | Rejected:
        return route(
            self._template, self._topics, aggregate_type, event_type, self._schema, self._table
        )

    @staticmethod
    def _extra_headers(raw: ColumnValue) -> Headers | Rejected:
        if raw is None or type(raw) is not bytes:
            # NULL, or an unchanged-TOAST marker (never in an INSERT): nothing to add.
            return []
        try:
            # Numbers stay as the text PostgreSQL printed (10.10 must not become 10.1).
            parsed = json.loads(
                raw, parse_float=_JsonNumber, parse_int=_JsonNumber, parse_constant=_JsonNumber
            )
        except (ValueError, UnicodeDecodeError, RecursionError):
            return Rejected("the headers column is not valid JSON", None, None, [])
        if not isinstance(parsed, dict):
            return Rejected("the headers column is not a JSON object", None, None, [])
        extra: Headers = []
        for name, item in parsed.items():
            if isinstance(item, str):
                extra.append((name, item.encode("utf-8")))
            else:
                extra.append((name, json_text(item).encode("utf-8")))
        return extra

    def _timestamp_ms(self, raw: ColumnValue) -> int:
        if type(raw) is not bytes:
            return 0
        return parse_timestamp_ms(raw)


def route(
    template: str,
    topics: dict[tuple[bytes, bytes], str],
    aggregate_type: bytes,
    event_type: bytes,
    schema: str,
    table: str,
) -> str | Rejected:
    """The topic of an event by the template, remembered in ``topics``; or why there is none."""
    try:
        topic = template.format(
            aggregate_type=aggregate_type.decode("utf-8"),
            event_type=event_type.decode("utf-8"),
            schema=schema,
            table=table,
        )
    except UnicodeDecodeError:
        return Rejected("the routing columns are not valid UTF-8", None, None, [])
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        # Settings validate the template; this keeps map() total all the same.
        return Rejected(f"the topic template cannot be applied: {exc}", None, None, [])
    if not legal_topic(topic):
        return Rejected(
            f"invalid topic name {topic[:300]!r}: Kafka allows 1-249 characters of [A-Za-z0-9._-]",
            None,
            None,
            [],
        )
    if len(topics) >= _TOPIC_CACHE_LIMIT:
        topics.clear()
    topics[(aggregate_type, event_type)] = topic
    return topic


# The framing of core/framing.py (not imported: constants of this module compile to C ones;
# tests/unit/test_framing.py checks that both agree).
_FRAME_VERSION: Final = 1
_FRAME_NULL_PAYLOAD: Final = 1
_FRAME_MIN_SIZE: Final = 20
# A message event's {schema} in the topic template (its {table} is the prefix), and the start
# of its source's name (message:<prefix>) in dead-letter headers, kept rows and metrics.
MESSAGE_SCHEMA: Final = "message"
MESSAGE_SOURCE_PREFIX: Final = "message:"


def _string2(content: bytes, pos: int) -> tuple[bytes, int]:
    """A UInt16-length string of the framing at ``pos``: (its bytes, the next position), or
    (b"", -1) when the content ends first."""
    end = len(content)
    if pos + 2 > end:
        return b"", -1
    n = (content[pos] << 8) | content[pos + 1]
    pos += 2
    if pos + n > end:
        return b"", -1
    return content[pos : pos + n], pos + n


class MessagePlan:
    """The mapping of logical decoding messages with the relay's prefix: the framing's fields
    play the roles of a table's columns, with the same routing, key, headers and timestamp."""

    __slots__ = (
        "_last_aggregate_type",
        "_last_event_type",
        "_last_topic",
        "_template",
        "_topics",
        "prefix",
        "table",
    )

    def __init__(self, prefix: str, topic_template: str) -> None:
        self.prefix = prefix
        # The source's name in dead-letter headers, kept rows and metrics.
        self.table = MESSAGE_SOURCE_PREFIX + prefix
        self._template = topic_template
        self._topics: dict[tuple[bytes, bytes], str] = {}
        self._last_aggregate_type: bytes | None = None
        self._last_event_type = b""
        self._last_topic = ""

    def map(self, content: bytes) -> OutboxRecord | Rejected:
        """Turn one message's content into a record, or a Rejected verdict. Never raises."""
        if len(content) < _FRAME_MIN_SIZE:
            return Rejected(
                f"the message content is {len(content)} bytes, shorter than any event "
                f"({_FRAME_MIN_SIZE})",
                None,
                None,
                [],
            )
        version = content[0]
        if version != _FRAME_VERSION:
            return Rejected(
                f"the message content is in framing version {version}; this relay reads "
                f"version {_FRAME_VERSION}",
                None,
                None,
                [],
            )
        flags = content[1]
        if flags & ~_FRAME_NULL_PAYLOAD:
            return Rejected(f"unknown framing flags {flags:#04x}", None, None, [])
        timestamp_ms = int.from_bytes(content[2:10], "big", signed=True)
        event_id, pos = _string2(content, 10)
        aggregate_type, pos = _string2(content, pos) if pos >= 0 else (b"", -1)
        key, pos = _string2(content, pos) if pos >= 0 else (b"", -1)
        event_type, pos = _string2(content, pos) if pos >= 0 else (b"", -1)
        if pos < 0 or pos + 2 > len(content):
            return Rejected("the message content ends inside its fields", None, None, [])
        headers: Headers = [
            ("id", event_id),
            ("event_type", event_type),
            ("aggregate_type", aggregate_type),
        ]
        count = (content[pos] << 8) | content[pos + 1]
        pos += 2
        for _ in range(count):
            name, pos = _string2(content, pos)
            if pos < 0 or pos + 4 > len(content):
                return Rejected("the message content ends inside its headers", key, None, headers)
            size = int.from_bytes(content[pos : pos + 4], "big")
            pos += 4
            if pos + size > len(content):
                return Rejected("the message content ends inside its headers", key, None, headers)
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                return Rejected("a header name is not valid UTF-8", key, None, headers)
            headers.append((text, content[pos : pos + size]))
            pos += size
        value: bytes | None = None if flags & _FRAME_NULL_PAYLOAD else content[pos:]
        topic: str | None
        if aggregate_type == self._last_aggregate_type and event_type == self._last_event_type:
            topic = self._last_topic
        else:
            found = self._topics.get((aggregate_type, event_type))
            if found is None:
                routed = route(
                    self._template,
                    self._topics,
                    aggregate_type,
                    event_type,
                    MESSAGE_SCHEMA,
                    self.prefix,
                )
                if isinstance(routed, Rejected):
                    return Rejected(routed.error, key, value, headers)
                found = routed
            topic = found
            self._last_aggregate_type = aggregate_type
            self._last_event_type = event_type
            self._last_topic = topic
        return OutboxRecord(topic, key, value, headers, timestamp_ms if timestamp_ms > 0 else 0)


class _JsonNumber:
    """A JSON number kept as its source text (not a str subclass: mypyc compiles none)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def json_text(value: object) -> str:
    """Compact JSON text of a parsed value whose numbers are _JsonNumber (kept verbatim)."""
    if isinstance(value, _JsonNumber):
        return value.text
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{json_text(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def parse_timestamp_ms(raw: bytes) -> int:
    """PostgreSQL's ISO timestamp text → Unix milliseconds; 0 when it has no such value
    (infinity, BC, years past 9999). A timestamp without time zone is taken as UTC."""
    try:
        text = raw.decode("ascii")
        moment = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Integer arithmetic: a float of seconds times 1000 can land one millisecond short.
    millis = (moment - _UNIX_EPOCH) // _ONE_MS
    return millis if millis > 0 else 0


def dead_letter_record(
    rejected: Rejected,
    *,
    topic: str,
    source_lsn: str,
    source_table: str,
    include_value: bool = True,
) -> OutboxRecord:
    """The record that carries a rejected row to the dead-letter topic."""
    headers = [
        *rejected.headers,
        ("error", rejected.error.encode("utf-8")),
        ("source_lsn", source_lsn.encode("ascii")),
        ("source_table", source_table.encode("utf-8")),
    ]
    return OutboxRecord(topic, rejected.key, rejected.value if include_value else None, headers, 0)
