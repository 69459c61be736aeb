"""What the relay says about PostgreSQL versions, slots and failover, without a server: the
supported range, why a slot was invalidated, replication errors, keepalives, and the failover
explanations of setup and status."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from cdc_relay.adapters.database import TCP_KEEPALIVES, with_tcp_keepalives
from cdc_relay.adapters.replication import _result_error, slot_invalidation_reason
from cdc_relay.errors import (
    ConfigError,
    ReplicationError,
    SlotInUse,
    SlotInvalidated,
    UnsupportedServer,
)
from cdc_relay.ops import admin
from cdc_relay.ops.failover import ServerFacts, Standby, explain, wants_failover
from cdc_relay.settings import load_settings

# --------------------------------------------------------------------------- supported range


def fake_conn(version_num: int) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(server_version=version_num))


@pytest.mark.parametrize("version_num", [150000, 150014, 160014, 170010, 180006])
def test_versions_15_to_18_are_supported(version_num: int):
    assert admin.require_supported_version(fake_conn(version_num)) == version_num  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version_num", "shown"),
    [(140011, "14.11"), (130000, "13.0"), (190000, "19.0"), (90624, "9.6.24")],
)
def test_other_versions_are_refused_in_one_line(version_num: int, shown: str):
    with pytest.raises(UnsupportedServer) as caught:
        admin.require_supported_version(fake_conn(version_num))  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"PostgreSQL {shown} is not supported: cdc-relay supports PostgreSQL 15 to 18"
    )


# --------------------------------------------------------------------------- invalidated slots


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("wal_removed", "removed WAL it still needed"),
        ("rows_removed", "removed catalog rows"),
        ("wal_level_insufficient", "wal_level on the primary is no longer logical"),
        ("idle_timeout", "inactive for longer than idle_replication_slot_timeout"),
    ],
)
def test_a_lost_slot_says_why_it_was_invalidated(reason: str, words: str):
    text = str(SlotInvalidated("cdc_relay", reason))
    assert text.startswith(
        f"replication slot cdc_relay is lost (wal_status = lost, invalidation_reason = {reason})"
    )
    assert words in text
    assert "reconcile the gap" in text
    if reason != "wal_removed":
        assert "removed WAL" not in text


def test_a_lost_slot_without_a_known_reason_quotes_the_server():
    assert "reason unknown" in str(SlotInvalidated("s", None))
    text = str(SlotInvalidated("s", None, detail="can no longer get changes. conflict"))
    assert "the server says: can no longer get changes. conflict" in text


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        # 15: no invalidation_reason, no conflicting; a removed slot loses its restart_lsn
        ({"wal_status": "lost", "restart_lsn": None}, "wal_removed"),
        ({"wal_status": "reserved", "restart_lsn": "0/10"}, None),
        # 16: conflicting is true for *every* invalidation, WAL removal included
        ({"wal_status": "lost", "restart_lsn": None, "conflicting": True}, "wal_removed"),
        ({"wal_status": "lost", "restart_lsn": "0/10", "conflicting": True}, None),
        # 17+: the server says
        (
            {"wal_status": "lost", "restart_lsn": "0/1", "invalidation_reason": "idle_timeout"},
            "idle_timeout",
        ),
        ({"wal_status": "reserved", "restart_lsn": "0/1", "invalidation_reason": None}, None),
    ],
)
def test_why_a_slot_was_invalidated_on_each_version(view: dict, reason: str | None):
    assert slot_invalidation_reason(view) == reason


def test_status_text_shows_the_invalidation_and_failover_flags():
    report = {
        "server": {"version": "18.6", "supported": True, "in_recovery": True},
        "slot": {
            "slot_name": "cdc_relay",
            "plugin": "pgoutput",
            "database": "app",
            "active": False,
            "active_pid": None,
            "confirmed_flush_lsn": "0/10",
            "restart_lsn": "0/8",
            "wal_status": "lost",
            "lag_bytes": 16,
            "invalidation_reason": "idle_timeout",
            "failover": True,
            "synced": True,
            "temporary": False,
        },
        "publication": {"name": "cdc_relay", "tables": ["public.outbox"]},
        "oldest_unconfirmed": None,
        "failover": {"findings": [{"level": "warn", "text": "something"}]},
    }
    lines = admin.format_status(report).splitlines()
    assert "server        PostgreSQL 18.6 (standby, in recovery)" in lines
    assert any(line.startswith("  invalid     idle_timeout: it was inactive") for line in lines)
    assert "  failover    yes, synced yes" in lines
    assert lines[-2:] == ["failover", "  warn  something"]
    assert admin.health(report) == "lost"
    assert admin.health({**report, "slot": None}) == "not_set_up"
    no_publication = {**report, "publication": {"name": "cdc_relay", "tables": None}}
    assert admin.health(no_publication) == "not_set_up"
    healthy = {**report, "slot": {**report["slot"], "wal_status": "reserved"}}
    assert admin.health(healthy) == "ok"


# --------------------------------------------------------------------------- replication errors


@dataclass
class FakeResult:
    fields: dict[int, bytes] = field(default_factory=dict)
    status: int = pq.ExecStatus.FATAL_ERROR
    error_message: bytes = b""

    def error_field(self, code: int) -> bytes | None:
        return self.fields.get(code)


@dataclass
class FakeConn:
    error_message: bytes = b""


F = pq.DiagnosticField


def test_18s_invalid_slot_text_is_a_lost_slot_with_its_reason():
    result = FakeResult(
        {
            F.SQLSTATE: b"55000",
            F.MESSAGE_PRIMARY: b'can no longer access replication slot "cdc_relay"',
            F.MESSAGE_DETAIL: b'This replication slot has been invalidated due to "idle_timeout".',
        }
    )
    error = _result_error(result, "START_REPLICATION failed")  # type: ignore[arg-type]
    assert isinstance(error, SlotInvalidated)
    assert (error.slot, error.reason) == ("cdc_relay", "idle_timeout")


def test_the_older_invalid_slot_text_is_a_lost_slot_too():
    result = FakeResult(
        {
            F.SQLSTATE: b"55000",
            F.MESSAGE_PRIMARY: b'can no longer get changes from replication slot "cdc_relay"',
            F.MESSAGE_DETAIL: b"This slot has been invalidated because it exceeded the maximum "
            b"reserved size.",
        }
    )
    error = _result_error(result, "START_REPLICATION failed")  # type: ignore[arg-type]
    assert isinstance(error, SlotInvalidated) and error.reason == "wal_removed"


def test_other_prerequisite_errors_are_not_a_lost_slot():
    result = FakeResult(
        {F.SQLSTATE: b"55000", F.MESSAGE_PRIMARY: b"logical decoding requires wal_level >= logical"}
    )
    error = _result_error(result, "START_REPLICATION failed")  # type: ignore[arg-type]
    assert type(error) is ReplicationError
    assert str(error) == (
        "START_REPLICATION failed: logical decoding requires wal_level >= logical [SQLSTATE 55000]"
    )


def test_an_ended_session_says_what_the_server_said():
    result = FakeResult(
        {
            F.SQLSTATE: b"57P01",
            F.MESSAGE_PRIMARY: b"terminating connection due to administrator command",
        }
    )
    error = _result_error(result, "the server ended replication")  # type: ignore[arg-type]
    assert str(error) == (
        "the server ended replication: terminating connection due to administrator command "
        "[SQLSTATE 57P01]"
    )


def test_a_closed_connection_says_what_libpq_said():
    conn = FakeConn(b"server closed the connection unexpectedly\n\tThis probably means ...\n")
    error = _result_error(None, "the server ended replication", conn)  # type: ignore[arg-type]
    assert str(error) == (
        "the server ended replication: connection closed: server closed the connection "
        "unexpectedly This probably means ..."
    )
    bare = FakeResult(error_message=b"lost synchronization with server\n")
    assert "lost synchronization with server" in str(_result_error(bare, "x"))  # type: ignore[arg-type]
    done = FakeResult(status=pq.ExecStatus.COMMAND_OK)
    assert "no error reported (result status COMMAND_OK)" in str(_result_error(done, "x"))  # type: ignore[arg-type]
    assert "no detail" not in str(_result_error(done, "x"))  # type: ignore[arg-type]


def test_slot_in_use_keeps_its_class():
    result = FakeResult(
        {F.SQLSTATE: b"55006", F.MESSAGE_PRIMARY: b'replication slot "s" is active for PID 7'}
    )
    assert isinstance(_result_error(result, "x"), SlotInUse)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keepalives


def test_keepalives_are_added_to_a_url_and_a_dsn():
    for url in ("postgresql://u:p@db:5432/app", "host=db port=5432 dbname=app user=u password=p"):
        params = conninfo_to_dict(with_tcp_keepalives(url))
        assert {k: params[k] for k in TCP_KEEPALIVES} == TCP_KEEPALIVES
        assert (params["host"], params["dbname"], params["password"]) == ("db", "app", "p")


def test_keepalives_the_user_set_are_kept():
    url = "postgresql://db/app?keepalives_idle=60&tcp_user_timeout=0"
    params = conninfo_to_dict(with_tcp_keepalives(url))
    assert params["keepalives_idle"] == "60" and params["tcp_user_timeout"] == "0"
    assert params["keepalives_count"] == "3"
    everything = "dbname=app " + " ".join(f"{k}=9" for k in TCP_KEEPALIVES)
    assert with_tcp_keepalives(everything) == everything


def test_a_multi_host_url_keeps_its_hosts():
    url = "postgresql://a:5432,b:5433/app?target_session_attrs=read-write"
    params = conninfo_to_dict(with_tcp_keepalives(url))
    assert (params["host"], params["port"]) == ("a,b", "5432,5433")
    assert params["target_session_attrs"] == "read-write"


# --------------------------------------------------------------------------- failover


def test_the_failover_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CDC_RELAY_DATABASE_URL", "postgresql://db/app")
    assert load_settings().slot_failover == "auto"
    monkeypatch.setenv("CDC_RELAY_SLOT_FAILOVER", "sometimes")
    with pytest.raises(ConfigError, match="CDC_RELAY_SLOT_FAILOVER"):
        load_settings()
    assert wants_failover("auto", 170000) and not wants_failover("auto", 160014)
    assert wants_failover("on", 160014) and not wants_failover("off", 180006)


PRIMARY = ServerFacts(
    version_num=180006,
    in_recovery=False,
    wal_level="logical",
    synchronized_standby_slots=["sb1"],
    physical_slots={"sb1": True},
    standbys=[Standby("sb1", "10.0.0.2", "streaming", "async", "sb1", "0/3000000")],
)
STANDBY = ServerFacts(
    version_num=180006,
    in_recovery=True,
    wal_level="logical",
    sync_replication_slots=True,
    hot_standby_feedback=True,
    primary_slot_name="sb1",
    primary_conninfo_has_dbname=True,
)


def lines(facts: ServerFacts, **kwargs) -> list[str]:
    kwargs.setdefault("slot_name", "cdc_relay")
    kwargs.setdefault("slot_failover", True)
    return [f.line() for f in explain(facts, **kwargs)]


def test_a_primary_with_a_listed_standby_is_all_ok():
    out = lines(PRIMARY, slot_confirmed="0/2000000")
    assert out == [
        "ok    slot cdc_relay is a failover slot (failover = true)",
        "ok    standby sb1 (10.0.0.2) streams through physical slot sb1, has the WAL up to the "
        "relay's confirmed position",
        "ok    synchronized_standby_slots = sb1",
    ]
    behind = lines(PRIMARY, slot_confirmed="0/3000100")
    assert "256 bytes behind the relay's confirmed position" in behind[1]


def test_a_primary_that_does_not_list_its_standby_says_what_to_set():
    facts = replace(PRIMARY, synchronized_standby_slots=[])
    (warn,) = [line for line in lines(facts) if line.startswith("warn")]
    assert "synchronized_standby_slots does not name sb1" in warn
    assert "ALTER SYSTEM SET synchronized_standby_slots = 'sb1'" in warn


def test_a_listed_slot_that_is_missing_or_idle_stalls_the_relay():
    missing = replace(PRIMARY, synchronized_standby_slots=["sb1", "gone"])
    assert any("names gone, which is no physical slot" in line for line in lines(missing))
    idle = replace(PRIMARY, physical_slots={"sb1": False}, standbys=[])
    out = lines(idle)
    assert any("names sb1, whose standby is not streaming" in line for line in out)
    assert not any(line.startswith("ok    synchronized") for line in out)


def test_a_standby_without_a_slot_and_a_slot_without_failover():
    facts = replace(
        PRIMARY, standbys=[Standby("walreceiver", None, "streaming", "async", None, None)]
    )
    assert any("streams without a physical replication slot" in line for line in lines(facts))
    out = lines(PRIMARY, slot_failover=False)
    assert out[0].startswith("warn  slot cdc_relay does not follow failover (failover = false)")
    assert lines(PRIMARY, slot_failover=False, mode="off") == [
        "note  slot cdc_relay does not follow failover (CDC_RELAY_SLOT_FAILOVER=off): after a "
        "failover it is gone"
    ]


def test_a_primary_without_standbys_says_so():
    facts = replace(PRIMARY, synchronized_standby_slots=[], physical_slots={}, standbys=[])
    assert lines(facts)[1].startswith("note  no standby streams from this server")


def test_before_17_there_are_no_failover_slots():
    out = lines(replace(PRIMARY, version_num=160014))
    assert len(out) == 1 and out[0].startswith("note  PostgreSQL 16 has no failover slots (17+)")


def test_a_ready_standby_with_the_synced_slot():
    assert lines(STANDBY, slot_synced=True) == [
        "ok    this standby synchronises failover slots (sync_replication_slots, "
        "hot_standby_feedback, primary_slot_name sb1)",
        "ok    slot cdc_relay is synchronised here (synced = true)",
    ]


def test_a_standby_names_everything_it_lacks():
    facts = replace(
        STANDBY,
        sync_replication_slots=False,
        hot_standby_feedback=False,
        primary_slot_name="",
        primary_conninfo_has_dbname=False,
        wal_level="replica",
    )
    first = lines(facts, slot_synced=True)[0]
    for needed in (
        "sync_replication_slots = on",
        "hot_standby_feedback = on",
        "a primary_slot_name",
        "a dbname in primary_conninfo",
        "wal_level = logical",
    ):
        assert needed in first


def test_a_standby_without_the_slot_or_with_a_temporary_copy():
    assert "is not synchronised to this standby" in lines(STANDBY, slot_exists=False)[-1]
    assert "not yet persistent" in lines(STANDBY, slot_synced=True, slot_temporary=True)[-1]
    assert "not a synchronised copy" in lines(STANDBY, slot_synced=False)[-1]
    hidden = replace(STANDBY, primary_conninfo_has_dbname=None)
    assert any("cannot read primary_conninfo" in line for line in lines(hidden, slot_synced=True))
