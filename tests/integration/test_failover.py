"""Failover slots on a real primary and physical streaming standby (PostgreSQL 17+).

setup on the primary makes the slot a failover slot; the standby's slot synchronisation copies
it (pg_replication_slots.synced); status on each server says so; after the primary dies and the
standby is promoted, the relay resumes from the synchronised slot and loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    execute,
    insert_events,
    lsn_int,
    query,
    relay_env,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import PgClientMixin, PostgresServer, StandbyServer, wait_until

pytestmark = [pytest.mark.min_pg(17), pytest.mark.compat, pytest.mark.local_pg]


@dataclass
class Pair:
    primary: PostgresServer
    standby: StandbyServer


def _start_pair(pg: PgClientMixin, *, synchronous: bool = False) -> Pair:
    assert isinstance(pg, PostgresServer)  # a standby is made with pg_basebackup (local_pg)
    primary = PostgresServer(bindir=pg.bindir).start()
    try:
        standby = StandbyServer(primary).start()
    except BaseException:
        primary.close()
        raise
    # Only now: the standby would otherwise copy these settings from the primary's base backup.
    primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
    if synchronous:
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
    primary.execute("SELECT pg_reload_conf()")
    return Pair(primary, standby)


def _close(pair: Pair) -> None:
    try:
        pair.standby.close()
    finally:
        pair.primary.close()


@pytest.fixture(scope="module")
def pair(pg: PgClientMixin) -> Iterator[Pair]:
    """A primary with an asynchronous standby that synchronises failover slots, shared by the
    tests that do not promote it."""
    started = _start_pair(pg)
    try:
        yield started
    finally:
        _close(started)


def standby_slot(standby: StandbyServer, slot: str = "cdc_relay") -> dict | None:
    rows = standby.query(
        "SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = %s", (slot,)
    )
    return rows[0][0] if rows else None


def wait_synced(pair: Pair, database: str, *, past: int = 0, timeout: float = 90) -> dict:
    """Until the standby holds a persistent synchronised copy of the slot, confirmed at least
    to ``past``. The copy stays temporary until the primary's slot moves past what the standby
    had reserved; a standby snapshot in the WAL moves its catalog_xmin sooner than the
    bgwriter's (every 15 s)."""

    def synced() -> dict | None:
        pair.primary.execute("SELECT pg_log_standby_snapshot()", dbname=database)
        slot = standby_slot(pair.standby)
        if not slot or not slot["synced"] or slot["temporary"]:
            return None
        if lsn_int(slot["confirmed_flush_lsn"]) < past:
            return None
        return slot

    return wait_until(
        synced,
        timeout,
        interval=0.5,
        message=lambda: (
            f"slot not synchronised: {standby_slot(pair.standby)}\n"
            + pair.standby.log_text()[-2000:]
        ),
    )


def test_setup_makes_a_failover_slot_that_the_standby_synchronises(pair: Pair, kafka: str):
    url = pair.primary.create_database("sync_app")
    box = make_outbox(url, kafka)
    slot = query(
        url,
        "SELECT failover, synced FROM pg_replication_slots WHERE slot_name = %s",
        ("cdc_relay",),
    )
    assert slot == [(True, False)]
    with RelayProcess(box.env) as relay:
        end = insert_events(url, count=50, per_txn=10)
        wait_confirmed_past(url, end)
        copy = wait_synced(pair, "sync_app", past=end)
        assert relay.stop() == 0
    assert copy["failover"] is True and copy["synced"] is True
    assert copy["invalidation_reason"] is None

    primary = cli(box.env, "status")
    assert primary.returncode == 0, primary.stderr
    out = primary.stdout
    assert "(primary)" in out and "  failover    yes" in out
    assert "ok    standby standby1 streams through physical slot standby1" in out
    assert "ok    synchronized_standby_slots = standby1" in out
    report = json.loads(cli(box.env, "status", "--json").stdout)
    assert report["slot"]["failover"] is True
    assert [s["slot_name"] for s in report["failover"]["standbys"]] == ["standby1"]

    on_standby = {**box.env, "CDC_RELAY_DATABASE_URL": pair.standby.url(dbname="sync_app")}
    standby = cli(on_standby, "status")
    assert standby.returncode == 0, standby.stderr
    out = standby.stdout
    assert "(standby, in recovery)" in out
    assert "  failover    yes, synced yes" in out
    assert "ok    slot cdc_relay is synchronised here (synced = true)" in out
    assert "ok    this standby synchronises failover slots" in out
    report = json.loads(cli(on_standby, "status", "--json").stdout)
    assert report["slot"]["synced"] is True
    assert report["slot"]["lag_bytes"] is not None

    refused = cli(on_standby, "setup")
    assert refused.returncode == 1
    assert "this server is a standby (in recovery): run `cdc-relay setup` on the primary" in (
        refused.stderr
    )


def test_status_names_what_the_primary_lacks(pair: Pair, kafka: str):
    url = pair.primary.create_database("lacks_app")
    box = make_outbox(url, kafka, slot_name="cdc_lacks")
    pair.primary.execute("ALTER SYSTEM RESET synchronized_standby_slots")
    pair.primary.execute("SELECT pg_reload_conf()")
    try:
        wait_until(
            lambda: (
                "synchronized_standby_slots does not name standby1" in cli(box.env, "status").stdout
            ),
            30,
        )
    finally:
        pair.primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        pair.primary.execute("SELECT pg_reload_conf()")
    wait_until(
        lambda: "ok    synchronized_standby_slots = standby1" in cli(box.env, "status").stdout, 30
    )


def test_setup_turns_failover_on_for_an_existing_slot_once_it_is_free(db: str, kafka: str):
    execute(db, "SELECT pg_create_logical_replication_slot('cdc_relay', 'pgoutput')")
    env = relay_env(db, kafka)
    # Held by a replication session of its own: setup may not change it now.
    holder = psycopg.connect(db, autocommit=True, replication="database")
    try:
        holder.pgconn.send_query(
            b"START_REPLICATION SLOT cdc_relay LOGICAL 0/0 "
            b"(proto_version '1', publication_names 'cdc_relay')"
        )
        wait_until(lambda: query(db, "SELECT active FROM pg_replication_slots")[0][0], 30)
        busy = cli(env, "setup", "--create-table")
    finally:
        holder.close()
    assert busy.returncode == 1
    assert "is in use by pid" in busy.stderr and "stop the relay" in busy.stderr
    wait_until(lambda: not query(db, "SELECT active FROM pg_replication_slots")[0][0], 30)
    done = cli(env, "setup", "--create-table")
    assert done.returncode == 0, done.stderr
    assert "done  turned failover on for slot cdc_relay" in done.stdout
    assert query(db, "SELECT failover FROM pg_replication_slots") == [(True,)]
    off = cli({**env, "CDC_RELAY_SLOT_FAILOVER": "off"}, "setup")
    assert "done  turned failover off for slot cdc_relay" in off.stdout
    assert query(db, "SELECT failover FROM pg_replication_slots") == [(False,)]


@pytest.mark.pg_restart
@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
def test_after_a_failover_the_relay_resumes_from_the_synchronised_slot(
    pg: PgClientMixin, kafka: str, synchronous: bool
):
    pair = _start_pair(pg, synchronous=synchronous)
    try:
        url = pair.primary.create_database("failover_app")
        box = make_outbox(url, kafka)
        with RelayProcess(box.env) as relay:
            end = insert_events(url, count=100, per_txn=10)
            wait_confirmed_past(url, end)
            wait_synced(pair, "failover_app", past=end)
            relay.kill()
        # What the relay had not confirmed: the synchronised slot resends it after failover.
        insert_events(url, count=20, per_txn=10, start=100)
        last = lsn_int(query(url, "SELECT pg_current_wal_lsn()::text")[0][0])
        wait_until(
            lambda: (
                lsn_int(pair.standby.query("SELECT pg_last_wal_replay_lsn()::text")[0][0]) >= last
            ),
            30,
            message="the standby did not replay the last events",
        )
        pair.primary.stop("immediate")
        pair.standby.promote()

        new_url = pair.standby.url(dbname="failover_app")
        env = {**box.env, "CDC_RELAY_DATABASE_URL": new_url}
        status = cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "(primary)" in status.stdout
        with RelayProcess(env) as relay:
            end = insert_events(new_url, count=30, per_txn=10, start=120)
            wait_confirmed_past(new_url, end)
            assert relay.stop() == 0
        records = consume_all(kafka, [box.topic()], expected=150, timeout=60, linger=1)
        seqs = {json.loads(r.value or b"")["seq"] for r in records}
        assert seqs == set(range(150))
        assert confirmed_lsn(new_url) >= end
    finally:
        _close(pair)
