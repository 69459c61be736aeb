"""A PostgreSQL primary failover under load (PostgreSQL 17+: failover slots).

A primary and a physical streaming standby made with pg_basebackup, synchronising the relay's
failover slot (sync_replication_slots, hot_standby_feedback, primary_slot_name, a dbname in
primary_conninfo); the standby streams from the primary through a TcpProxy, so that its link
can be stalled. Writers insert under load (per-aggregate sequence numbers in commit order),
through the same multi-host URL as the relay (``target_session_attrs=read-write``). The primary
is stopped with ``pg_ctl -m immediate`` and the standby promoted; nobody restarts the relay.

- synchronous replication (``synchronous_standby_names``) with synchronized_standby_slots:
  every commit acknowledged to a writer survives the promotion;
- asynchronous replication with synchronized_standby_slots, the standby's link stalled for a
  while before the kill: the promoted database lacks the last commits, and so does Kafka;
- the unsafe configuration, asynchronous without synchronized_standby_slots, stalled the same
  way: the relay publishes and confirms what the standby never received. After the promotion
  those events are phantoms; the relay warned about the configuration at start and reports
  their WAL range.

In each: the events in Kafka against the outbox rows of the promoted database (lost, phantoms,
duplicates), per-key order of first occurrences, and the seconds from the promotion to the
relay streaming from the new primary.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.faults import results
from tests.faults.helpers import (
    Writers,
    consume_ids,
    delivery_figures,
    order_violations,
    outbox_ids,
)
from tests.faults.scale import sizes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    confirmed_lsn,
    current_lsn,
    lsn_int,
    slot_active,
    wait_confirmed_past,
)
from tests.servers import (
    PgClientMixin,
    PostgresServer,
    StandbyServer,
    TcpProxy,
    multi_host_url,
    wait_until,
)

pytestmark = [pytest.mark.min_pg(17), pytest.mark.local_pg, pytest.mark.pg_restart]

SEED_ENV = "CDC_RELAY_FAULTS_SEED"
DATABASE = "failover_app"


@dataclass
class Cluster:
    primary: PostgresServer
    standby: StandbyServer
    link: TcpProxy  # the standby's replication link to the primary


@contextmanager
def cluster(pg: PgClientMixin, *, synchronous: bool, standby_slots: bool) -> Iterator[Cluster]:
    assert isinstance(pg, PostgresServer)
    primary = PostgresServer(bindir=pg.bindir).start()
    link: TcpProxy | None = None
    standby: StandbyServer | None = None
    try:
        primary.create_database(DATABASE)
        standby = StandbyServer(primary).start()
        link = TcpProxy(primary.host, primary.port).start()
        standby.stream_through(link.listen_host, link.port)
        # Only now: the base backup would have carried them to the standby.
        if standby_slots:
            primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        if synchronous:
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
        primary.execute("SELECT pg_reload_conf()")
        yield Cluster(primary, standby, link)
    finally:
        try:
            if standby is not None:
                standby.close()
            if link is not None:
                link.close()
        finally:
            primary.close()


def synced_slot(c: Cluster, past: int) -> bool:
    """The standby holds a persistent synchronised copy of the slot, confirmed to ``past``. A
    standby snapshot in the WAL moves the primary slot's catalog_xmin, which the copy waits
    for, sooner than the bgwriter's (every 15 s)."""
    c.primary.execute("SELECT pg_log_standby_snapshot()", dbname=DATABASE)
    rows = c.standby.query(
        "SELECT synced, temporary, confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = 'cdc_relay'"
    )
    return bool(rows) and rows[0][0] and not rows[0][1] and lsn_int(rows[0][2]) >= past


def branch_point(server: PostgresServer) -> str:
    """Where the promoted server's timeline 2 branched off timeline 1 (its history file)."""
    content = server.query("SELECT pg_read_file('pg_wal/00000002.history')")[0][0]
    return str(content.split()[1])


@pytest.mark.parametrize(
    "mode",
    ["synchronous", "asynchronous", "unsafe"],
    ids=["sync", "async", "unsafe-no-synchronized-standby-slots"],
)
def test_primary_failover_under_load(pg: PgClientMixin, kafka: str, mode: str):
    size = sizes()
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))
    synchronous = mode == "synchronous"
    with cluster(pg, synchronous=synchronous, standby_slots=mode != "unsafe") as c:
        url = multi_host_url([c.primary, c.standby], DATABASE, target_session_attrs="read-write")
        promoted_url = c.standby.url(dbname=DATABASE)
        major = c.primary.major_version()
        box = make_outbox(url, kafka)
        Writers.prepare(url)
        writers = Writers(
            url,
            size.failover_events,
            size.failover_writers,
            size.failover_seconds,
            seed,
            reconnect=True,
        )
        with RelayProcess(box.env) as relay:
            wait_until(lambda: slot_active(c.primary.url(dbname=DATABASE)), 60, message=relay.log)
            primary_url = c.primary.url(dbname=DATABASE)
            start = current_lsn(primary_url)
            writers.start()
            # The standby must hold a usable copy of the slot before the primary dies.
            wait_synced = wait_until(
                lambda: writers.committed() >= size.failover_events // 3 and synced_slot(c, start),
                120,
                interval=0.2,
                message="no persistent synchronised slot on the standby",
            )
            assert wait_synced
            received = None
            if not synchronous:
                # The standby falls behind: the primary commits what it will never receive.
                c.link.stall()
                received = lsn_int(c.standby.received_lsn())
                stalled = writers.committed()
                per_second = size.failover_events / size.failover_seconds
                wait_until(
                    lambda: writers.committed() - stalled >= per_second * size.failover_lag_seconds,
                    60,
                    message="the writers made no progress while the standby lagged",
                )
                if mode == "unsafe":
                    # Nothing holds the relay back: it confirms what the standby lacks.
                    wait_until(
                        lambda: confirmed_lsn(primary_url) > received,
                        60,
                        message="the relay did not get ahead of the standby",
                    )
                else:
                    # synchronized_standby_slots: its walsender sent nothing the standby lacks.
                    assert confirmed_lsn(primary_url) <= received
            confirmed_at_kill = confirmed_lsn(primary_url)
            acked_at_kill = writers.committed()
            c.primary.stop("immediate")
            killed = time.monotonic()
            c.link.restore()  # closes the stalled link: the standby receives nothing more

            def detected() -> bool:
                # A failover manager takes a while to decide; meanwhile no host takes writes.
                assert relay.running(), relay.log()
                return time.monotonic() - killed >= size.failover_promote_after

            wait_until(detected, size.failover_promote_after + 30, interval=0.25)
            c.standby.promote()
            promoted = time.monotonic()
            wait_until(
                lambda: slot_active(promoted_url),
                120,
                interval=0.05,
                message=relay.log,
            )
            recovery_s = time.monotonic() - promoted
            writers.join(size.failover_seconds * 4 + 60)
            end = current_lsn(promoted_url)
            wait_confirmed_past(promoted_url, end, timeout=180)
            assert relay.running(), relay.log()
            assert relay.stop() == 0
            log = relay.log()

        promoted_ids = outbox_ids(promoted_url)
        branch = branch_point(c.standby)
        records = consume_ids(kafka, [box.topic()], expected=len(promoted_ids), timeout=180)
        consumed = {(r.header("id") or b"").decode() for r in records}
        lost, duplicates = delivery_figures(records, promoted_ids)
        phantoms = len(consumed - promoted_ids)
        acked_missing = len(writers.acked_ids - promoted_ids)
        violations = order_violations(records, consecutive=True)
        phantom_lines = [line for line in log.splitlines() if "phantom events" in line]
        unsafe_warnings = [
            line
            for line in log.splitlines()
            if " WARNING " in line and "synchronized_standby_slots is empty" in line
        ]
        resumed = [line for line in log.splitlines() if "resuming slot=cdc_relay" in line]

    names = {
        "synchronous": "primary failover (synchronous)",
        "asynchronous": "primary failover (asynchronous)",
        "unsafe": "primary failover, unsafe: no synchronized_standby_slots",
    }
    lag = (
        ""
        if received is None
        else f"; standby link stalled for {size.failover_lag_seconds:g} s of writes before the kill"
    )
    results.record(
        names[mode],
        events=len(promoted_ids),
        lost=lost,
        duplicates=duplicates,
        faults=f"PostgreSQL {major}: pg_ctl stop -m immediate of the primary under load, "
        f"standby promoted {promoted - killed:.0f} s later; "
        f"{size.failover_writers} writers, seed {seed}{lag}",
        recovery_s=recovery_s,
        notes=f"phantoms {phantoms} (in Kafka, not in the promoted database)"
        + (f", reported by the relay from {branch}" if phantom_lines else "")
        + f"; {len(writers.acked_ids)} acknowledged events, {acked_missing} of them missing "
        f"after the promotion; {writers.unknown} commits cut off; recovery: promotion to the "
        "relay holding the slot on the new primary",
        phantoms=phantoms,
        seed=seed,
    )
    print(
        f"failover {mode} seed {seed}: lost {lost}, phantoms {phantoms}, duplicates "
        f"{duplicates}, acked missing {acked_missing}, recovery {recovery_s:.1f} s, confirmed at "
        f"kill {confirmed_at_kill:X}, branch {branch}, acked at kill {acked_at_kill}"
    )
    assert "Traceback" not in log, log
    assert lost == 0, f"seed {seed}: {lost} events of the promoted database never reached Kafka"
    assert not violations, f"seed {seed}: {violations[:3]}"
    # The session after the promotion says what it resumed: the new timeline and its branch.
    assert any(f"timeline=2 (branched off timeline 1 at {branch})" in line for line in resumed), (
        resumed
    )
    assert recovery_s < 10, f"the relay streamed from the new primary {recovery_s:.1f} s late"
    if synchronous:
        assert acked_missing == 0, f"seed {seed}: acknowledged commits lost by the promotion"
    if mode == "unsafe":
        # By design: the relay published what the standby never had. It warned at start, once,
        # and it reports the phantoms with their WAL range.
        assert phantoms > 0
        assert len(unsafe_warnings) == 1, log
        assert len(phantom_lines) == 1, log
        found = re.search(r"between (\S+) and (\S+) on timeline 1", phantom_lines[0])
        assert found and found.group(1) == branch, phantom_lines
        assert " ERROR " in phantom_lines[0]
    else:
        assert phantoms == 0, f"seed {seed}: {phantoms} events in Kafka the database lacks"
        assert not phantom_lines and not unsafe_warnings, log
