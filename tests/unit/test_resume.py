"""What the relay checks when it resumes its slot (runtime/resume.py), against fake servers: the
same cluster, the timeline and its branch point, phantom events past it, the one line at
session start; and the pure parts behind it (timeline history files, the unsafe configuration,
multi-host connection errors, the pool's reconnection schedule)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import pytest

from cdc_relay.adapters.database import (
    _PromptReconnection,
    describe_connect_error,
    describe_psycopg_error,
)
from cdc_relay.adapters.replication import (
    SystemIdentity,
    TimelineSwitch,
    parse_timeline_history,
)
from cdc_relay.core.lsn import Lsn, parse_lsn
from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import ForeignServer, ReplicationError
from cdc_relay.ops import failover
from cdc_relay.ops.admin import SlotInfo
from cdc_relay.ops.failover import ServerFacts, Standby, unsafe_configuration
from cdc_relay.runtime import resume
from cdc_relay.runtime.resume import ResumeCheck, branch_point

SYSTEM = "7714271472792010609"


@dataclass
class FakeServer:
    """What IDENTIFY_SYSTEM and TIMELINE_HISTORY answer."""

    system_id: str = SYSTEM
    timeline: int = 1
    histories: dict[int, list[TimelineSwitch]] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)

    def identify_system(self) -> SystemIdentity:
        return SystemIdentity(self.system_id, self.timeline, Lsn(0x5000000), "app")

    def timeline_history(self, timeline: int) -> list[TimelineSwitch]:
        self.asked.append(timeline)
        return self.histories[timeline]


def slot(confirmed: str = "0/3000000", *, failover_: bool | None = True, synced=None) -> SlotInfo:
    return SlotInfo(
        slot_name="cdc_relay",
        plugin="pgoutput",
        database="app",
        active=True,
        active_pid=42,
        confirmed_flush_lsn=confirmed,
        restart_lsn=confirmed,
        wal_status="reserved",
        lag_bytes=0,
        failover=failover_,
        synced=synced,
    )


@pytest.fixture
def no_config_check(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """failover.gather over a fake connection: a primary with no standby."""
    gathered: list[object] = []

    def gather(conn: object) -> ServerFacts:
        gathered.append(conn)
        return ServerFacts(version_num=180006, in_recovery=False, wal_level="logical")

    monkeypatch.setattr(resume.failover, "gather", gather)
    return gathered


def session(
    check: ResumeCheck, server: FakeServer, stats: RelayStats, *, produced: int, confirmed: int
) -> None:
    """One session that streamed: identified, resumed, then produced and confirmed."""
    check.identify(server)
    check.resumed(object(), slot())  # type: ignore[arg-type]
    stats.produced_through = produced
    stats.confirmed_lsn = confirmed


def test_the_history_file_gives_where_each_ancestor_ended():
    content = "1\t0/3000158\tno recovery target specified\n\n2\t0/5000A0\tbefore 2026-01-01\n"
    history = parse_timeline_history(content)
    assert history == [
        TimelineSwitch(1, parse_lsn("0/3000158")),
        TimelineSwitch(2, parse_lsn("0/5000A0")),
    ]
    assert branch_point(history, 1) == parse_lsn("0/3000158")
    assert branch_point(history, 2) == parse_lsn("0/5000A0")
    assert branch_point(history, 3) is None
    with pytest.raises(ReplicationError, match="unexpected line"):
        parse_timeline_history("garbage here\n")


def test_the_first_session_says_what_it_resumes(caplog, no_config_check):
    check = ResumeCheck("cdc_relay", RelayStats())
    caplog.set_level(logging.INFO, logger="cdc_relay.runtime.resume")
    check.identify(FakeServer())
    check.resumed(object(), slot(synced=False))  # type: ignore[arg-type]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"resuming slot=cdc_relay on system_id={SYSTEM} timeline=1, slot failover=yes "
        "synced=no, confirmed lsn=0/3000000"
    )
    assert no_config_check  # the configuration was checked once


def test_before_17_the_line_says_there_are_no_failover_slots(caplog, no_config_check):
    check = ResumeCheck("cdc_relay", RelayStats())
    caplog.set_level(logging.INFO, logger="cdc_relay.runtime.resume")
    check.identify(FakeServer())
    check.resumed(object(), slot(failover_=None))  # type: ignore[arg-type]
    assert "slot failover=n/a (no failover slots before PostgreSQL 17)" in caplog.text


def test_another_cluster_behind_the_url_is_a_halt(no_config_check):
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    session(check, FakeServer(), stats, produced=0x3000100, confirmed=0x3000100)
    with pytest.raises(ForeignServer, match="another cluster \\(system identifier 1234"):
        check.identify(FakeServer(system_id="1234"))


def test_a_timeline_that_does_not_descend_from_the_previous_one_is_a_halt(no_config_check):
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    server = FakeServer(timeline=2, histories={2: [TimelineSwitch(1, Lsn(0x3000000))]})
    session(check, server, stats, produced=0x3100000, confirmed=0x3100000)
    with pytest.raises(ForeignServer, match="timeline 1, which does not descend from timeline 2"):
        check.identify(FakeServer(timeline=1))  # an old primary running again
    sibling = FakeServer(timeline=3, histories={3: [TimelineSwitch(1, Lsn(0x3000000))]})
    with pytest.raises(ForeignServer, match="timeline 3, which does not descend from timeline 2"):
        check.identify(sibling)


def test_a_failover_without_phantoms(caplog, no_config_check):
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    session(check, FakeServer(), stats, produced=0x3000100, confirmed=0x3000100)
    promoted = FakeServer(timeline=2, histories={2: [TimelineSwitch(1, Lsn(0x3000200))]})
    caplog.clear()
    caplog.set_level(logging.INFO, logger="cdc_relay.runtime.resume")
    check.identify(promoted)
    check.resumed(object(), slot("0/3000080", synced=True))  # type: ignore[arg-type]
    assert promoted.asked == [2]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "timeline=2 (branched off timeline 1 at 0/3000200)" in line
    assert "slot failover=yes synced=yes, confirmed lsn=0/3000080" in line
    assert "128 bytes behind the 0/3000100 this relay had confirmed" in line
    assert "duplicates, not loss" in line
    assert stats.produced_through == 0  # counted afresh on the new timeline


def test_events_produced_past_the_branch_point_are_reported_once_as_phantoms(
    caplog, no_config_check
):
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    # Two sessions on timeline 1: the first got further than the second (a replay).
    session(check, FakeServer(), stats, produced=0x3000900, confirmed=0x3000400)
    session(check, FakeServer(), stats, produced=0x3000600, confirmed=0x3000500)
    promoted = FakeServer(timeline=2, histories={2: [TimelineSwitch(1, Lsn(0x3000300))]})
    caplog.clear()
    caplog.set_level(logging.INFO, logger="cdc_relay.runtime.resume")
    check.identify(promoted)
    check.identify(promoted)  # START_REPLICATION failed once (slot in use): asked again
    check.resumed(object(), slot("0/3000200", synced=True))  # type: ignore[arg-type]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert "transactions ending between 0/3000300 and 0/3000900 on timeline 1" in text
    assert errors[0].phantoms_through == "0/3000900"  # type: ignore[attr-defined]
    (info,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "had confirmed 0/3000500, past the branch point (phantoms)" in info
    assert "256 bytes behind the 0/3000300" in info  # resent: up to the branch point only
    # The next session on timeline 2 reports nothing again.
    caplog.clear()
    stats.produced_through = 0x3000800
    check.identify(promoted)
    check.resumed(object(), slot("0/3000800", synced=True))  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_new_primary_whose_slot_was_not_synchronised_is_a_warning(caplog, no_config_check):
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    session(check, FakeServer(), stats, produced=0, confirmed=0x3000100)
    caplog.clear()
    check.identify(FakeServer(timeline=2, histories={2: [TimelineSwitch(1, Lsn(0x3000200))]}))
    check.resumed(object(), slot("0/3000000", synced=False))  # type: ignore[arg-type]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "is not a synchronised copy of the old primary's (synced = false)" in warning


PRIMARY = ServerFacts(
    version_num=180006,
    in_recovery=False,
    wal_level="logical",
    synchronized_standby_slots=[],
    physical_slots={"sb1": True, "sb2": False},
    standbys=[Standby("sb1", None, None, None, "sb1", None)],
)


def test_the_unsafe_configuration_is_said_with_the_fix():
    text = unsafe_configuration(PRIMARY, slot_name="cdc_relay", slot_failover=True)
    assert text is not None
    assert "synchronized_standby_slots is empty while physical standbys stream through sb1" in text
    assert "phantoms" in text
    assert "ALTER SYSTEM SET synchronized_standby_slots = 'sb1'" in text
    partial = replace(PRIMARY, synchronized_standby_slots=["sb2"])
    text = unsafe_configuration(partial, slot_name="cdc_relay", slot_failover=True)
    assert text is not None and "does not name sb1" in text and "= 'sb1,sb2'" in text


@pytest.mark.parametrize(
    "facts, slot_failover",
    [
        (replace(PRIMARY, synchronized_standby_slots=["sb1"]), True),  # listed
        (PRIMARY, False),  # not a failover slot: it is lost in a failover anyway
        (replace(PRIMARY, physical_slots={"sb1": False}, standbys=[]), True),  # none streams
        (replace(PRIMARY, in_recovery=True), True),  # a standby
        (replace(PRIMARY, version_num=160014), None),  # no failover slots
    ],
)
def test_no_warning_when_no_standby_can_fall_behind(facts, slot_failover):
    assert unsafe_configuration(facts, slot_name="cdc_relay", slot_failover=slot_failover) is None


def test_the_unsafe_configuration_is_checked_once_per_server(monkeypatch, caplog):
    monkeypatch.setattr(failover, "gather", lambda conn: PRIMARY)
    stats = RelayStats()
    check = ResumeCheck("cdc_relay", stats)
    for _ in range(3):
        check.identify(FakeServer())
        check.resumed(object(), slot())  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "synchronized_standby_slots is empty" in warnings[0].getMessage()


MULTI = (
    'connection failed: connection to server at "127.0.0.1", port 45419 failed: Connection '
    "refused\n\tIs the server running on that host and accepting TCP/IP connections?\n"
    "Multiple connection attempts failed. All failures were:\n"
    "- host: '127.0.0.1', port: '51385', hostaddr: '127.0.0.1': connection failed: connection "
    'to server at "127.0.0.1", port 51385 failed: session is read-only\n'
    "- host: '127.0.0.1', port: '45419', hostaddr: '127.0.0.1': connection failed: connection "
    'to server at "127.0.0.1", port 45419 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?"
)


def test_a_failed_multi_host_connection_says_what_each_host_answered():
    expected = (
        "no host would do (127.0.0.1:51385: session is read-only; 127.0.0.1:45419: Connection "
        "refused)"
    )
    assert describe_connect_error(Exception(MULTI)) == expected
    assert describe_psycopg_error(Exception(MULTI)) == expected


def test_libpq_errors_keep_what_happened_not_the_hint():
    closed = (
        "consuming input failed: server closed the connection unexpectedly\n\tThis probably "
        "means the server terminated abnormally\n\tbefore or while processing the request."
    )
    assert describe_psycopg_error(Exception(closed)) == (
        "consuming input failed: server closed the connection unexpectedly"
    )
    fatal = (
        'connection to server at "h" failed: FATAL:  password authentication failed for user "u"'
    )
    assert describe_psycopg_error(Exception(fatal)) == 'password authentication failed for user "u"'


def test_the_pool_tries_again_every_second_while_the_database_is_away():
    attempt = _PromptReconnection(timeout=300)
    delays = []
    for step in range(10):
        attempt.update_delay(float(step))
        delays.append(attempt.delay)
    assert all(0.85 <= d <= 1.0 for d in delays), delays
