"""`cdc-relay skip --lsn X/Y`: the way past a row that halted the relay.

Under ``CDC_RELAY_DEAD_LETTER_POLICY=halt`` a row that can never be delivered stops the relay
before it, and because the row is in the WAL every restart would halt again. ``skip`` records
the event's own WAL position (which the halt line prints) in the control table
cdc_relay_skipped; the relay reads it at the start of every session and dead-letters exactly
that event, whatever the policy, and nothing else. Before recording it, ``skip`` peeks at the
slot (the relay must be stopped) to check that an outbox insert (or an event message) sits at
that position.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdc_relay.core.lsn import Lsn, format_lsn, parse_lsn
from cdc_relay.core.mapping import MessagePlan, OutboxRecord, Rejected, TablePlan
from cdc_relay.core.pgoutput import Decoder, Insert, LogicalMessage, Relation
from cdc_relay.core.pipeline import PROTO_VERSION, event_id
from cdc_relay.errors import ConfigError, PrerequisiteError
from cdc_relay.ops import admin
from cdc_relay.ops.control import SKIPPED_TABLE, control_table
from cdc_relay.settings import Settings

Connection = psycopg.Connection[tuple[Any, ...]]

# Peek this many changes at first, then twice as many, until the position is passed.
_FIRST_PEEK = 1_000


def pending(conn: Connection, settings: Settings, start: Lsn) -> frozenset[int]:
    """Skips recorded for this slot that the stream may still bring (at or after the slot's
    restart position: a change before it is never sent again). Empty when the control table
    does not exist."""
    del start  # the confirmed position is not enough: see the docstring
    table = control_table(settings, SKIPPED_TABLE)
    if conn.execute("SELECT to_regclass(%s)", (table.as_string(conn),)).fetchone() == (None,):
        return frozenset()
    rows = conn.execute(
        sql.SQL(
            "SELECT k.lsn::text FROM {} k LEFT JOIN pg_replication_slots s "
            "ON s.slot_name = k.slot_name WHERE k.slot_name = %s "
            "AND (s.restart_lsn IS NULL OR k.lsn >= s.restart_lsn)"
        ).format(table),
        (settings.slot_name,),
    ).fetchall()
    return frozenset(parse_lsn(row[0]) for row in rows)


def find_event(conn: Connection, settings: Settings, lsn: Lsn) -> str:
    """The event id of the outbox insert at ``lsn`` in the slot's stream (peeked, not consumed).
    PrerequisiteError when the slot is in use or nothing of the outbox sits there."""
    slot = admin.require_slot(conn, settings)
    if slot.active:
        raise PrerequisiteError(
            f"replication slot {settings.slot_name} is in use by pid {slot.active_pid}: stop "
            "every relay on it first (a halted relay has exited; a hot standby may hold it)"
        )
    if slot.confirmed is not None and lsn < slot.confirmed and slot.restart_lsn:
        restart = parse_lsn(slot.restart_lsn)
        if lsn < restart:
            raise PrerequisiteError(
                f"{format_lsn(lsn)} is before the slot's restart position {slot.restart_lsn}: "
                "the relay will never read it again, there is nothing to skip"
            )
    limit = _FIRST_PEEK
    while True:
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, %s, 'proto_version', %s, 'publication_names', %s, 'messages', %s)",
            (
                settings.slot_name,
                limit,
                str(PROTO_VERSION),
                settings.publication_name,
                "true" if settings.messages else "false",
            ),
        ).fetchall()
        found = _event_at(rows, lsn, settings)
        if found is not None:
            return found
        last = parse_lsn(rows[-1][0]) if rows else None
        if len(rows) < limit or last is None or last > lsn:
            tables = ", ".join(settings.qualified_tables) or "an outbox table"
            also = " and no event message" if settings.messages else ""
            raise PrerequisiteError(
                f"no insert into {tables} at {format_lsn(lsn)}{also} in the stream of "
                f"slot {settings.slot_name}: check the position in the relay's halt message"
            )
        limit *= 2


def _event_at(rows: list[tuple[str, bytes]], lsn: Lsn, settings: Settings) -> str | None:
    decoder = Decoder(PROTO_VERSION)
    plans: dict[int, TablePlan] = {}
    outboxes = {table: f"{table[0]}.{table[1]}" for table in settings.tables}
    for text, data in rows:
        message = decoder.decode(bytes(data))
        if type(message) is Relation and (message.namespace, message.name) in outboxes:
            name = outboxes[(message.namespace, message.name)]
            plans[message.relid] = TablePlan(
                message, settings.table_mapping(name), settings.topic_template
            )
        elif (
            type(message) is LogicalMessage
            and settings.messages
            and message.prefix == settings.message_prefix
            and parse_lsn(text) == lsn
        ):
            mapped = MessagePlan(settings.message_prefix, settings.topic_template).map(
                message.content
            )
            return event_id(mapped.headers)
        elif type(message) is Insert and parse_lsn(text) == lsn:
            plan = plans.get(message.relid)
            if plan is None:
                return None
            outcome: OutboxRecord | Rejected = plan.map(message.new)
            return event_id(outcome.headers)
    return None


def skip(conn: Connection, settings: Settings, lsn_text: str, *, say: admin.Say) -> str:
    """Record the skip of the event at ``lsn_text``; returns its event id."""
    try:
        lsn = parse_lsn(lsn_text)
    except ValueError:
        raise ConfigError(
            f"skip: --lsn {lsn_text!r} is not an LSN (X/Y, as the halt line gives)"
        ) from None
    table = control_table(settings, SKIPPED_TABLE)
    if conn.execute("SELECT to_regclass(%s)", (table.as_string(conn),)).fetchone() == (None,):
        raise PrerequisiteError(
            f"table {settings.control_schema}.{SKIPPED_TABLE} does not exist: run `cdc-relay setup`"
        )
    event = find_event(conn, settings, lsn)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (slot_name, lsn, event_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(table),
        (settings.slot_name, format_lsn(lsn), event),
    )
    say(
        f"done  event {event} at {format_lsn(lsn)} will be dead-lettered, not delivered, when "
        f"the relay next reads it (slot {settings.slot_name}); start `cdc-relay run` again"
    )
    return event
