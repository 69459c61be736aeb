"""`cdc-relay status` as text: the oldest unconfirmed event line, the sources."""

from __future__ import annotations

import pytest

from cdc_relay.ops.admin import format_status


def report(oldest: dict[str, object] | None) -> dict[str, object]:
    return {
        "slot": {
            "slot_name": "cdc_relay",
            "plugin": "pgoutput",
            "database": "app",
            "active": False,
            "active_pid": None,
            "confirmed_flush_lsn": "0/16B3748",
            "restart_lsn": "0/16B3700",
            "wal_status": "reserved",
            "lag_bytes": 2048,
        },
        "publication": {"name": "cdc_relay", "tables": ["public.outbox"]},
        "outbox_table": "public.outbox",
        "oldest_unconfirmed": oldest,
    }


@pytest.mark.parametrize(
    ("oldest", "line"),
    [
        (None, "  unconfirmed unknown"),
        ({"created_at": None, "age_seconds": 0.0}, "  unconfirmed none"),
        (
            {"created_at": "2026-01-01 10:00:00+00", "age_seconds": 42.25},
            "  unconfirmed oldest event 42.2 s old (created 2026-01-01 10:00:00+00)",
        ),
        (
            {"created_at": "2026-01-01 10:00:00+00", "age_seconds": 3 * 3600.0},
            "  unconfirmed oldest event 3.0 h old (created 2026-01-01 10:00:00+00)",
        ),
    ],
)
def test_the_oldest_unconfirmed_event_line(oldest, line):
    assert line in format_status(report(oldest)).splitlines()


def test_the_sources_lines_say_which_source_is_active_and_what_to_do_otherwise():
    text = format_status(
        {
            **report(None),
            "sources": {
                "tables": [
                    {"table": "public.outbox", "exists": True, "published": True},
                    {"table": "billing.outbox", "exists": True, "published": False},
                    {"table": "shipping.outbox", "exists": False, "published": False},
                ],
                "messages": {"prefix": "cdc_relay.outbox", "functions": "other prefix"},
            },
        }
    ).splitlines()
    start = text.index("sources       table public.outbox: active")
    assert text[start + 1 : start + 4] == [
        "              table billing.outbox: NOT ACTIVE: not in the publication (run "
        "`cdc-relay setup`)",
        "              table shipping.outbox: NOT ACTIVE: the table does not exist (run "
        "`cdc-relay setup`)",
        "              messages with prefix cdc_relay.outbox: active (cdc_relay_emit_event "
        "emits another prefix: run `cdc-relay setup`)",
    ]
    off = format_status({**report(None), "sources": {"tables": [], "messages": None}})
    assert "sources       messages: off (CDC_RELAY_MESSAGE_PREFIX is empty)" in off
