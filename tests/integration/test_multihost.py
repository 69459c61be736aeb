"""A multi-host database URL (``postgresql://u@standby,primary/app?target_session_attrs=
read-write``): every connection of the relay (the first credentials check, the pool, the
replication connection) lands on the primary, whichever host comes first; the pool comes back
within a second of the database; and without failover slots a failover halts the relay on the
missing slot, saying what that means, instead of re-creating it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from cdc_relay.adapters.database import connect, open_pool
from cdc_relay.adapters.replication import open_replication_connection
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    insert_events,
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


@pytest.fixture
def pair(pg: PgClientMixin) -> Iterator[tuple[PostgresServer, StandbyServer]]:
    assert isinstance(pg, PostgresServer)  # a standby is made with pg_basebackup
    primary = PostgresServer(bindir=pg.bindir).start()
    try:
        standby = StandbyServer(primary).start()
        try:
            yield primary, standby
        finally:
            standby.close()
    finally:
        primary.close()


def where(conn: psycopg.Connection) -> tuple[int, bool]:
    row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


@pytest.mark.compat
@pytest.mark.local_pg
def test_every_connection_finds_the_primary_whichever_host_comes_first(pair):
    primary, standby = pair
    url = multi_host_url([standby, primary], target_session_attrs="read-write")
    with connect(url) as conn:  # what `run` checks credentials with, and the commands use
        assert where(conn) == (primary.port, False)
    pool = open_pool(url)
    try:
        with pool.connection() as conn:
            assert where(conn) == (primary.port, False)
    finally:
        pool.close()
    replication = open_replication_connection(url)
    try:
        assert where(replication) == (primary.port, False)
    finally:
        replication.close()
    # Without target_session_attrs libpq keeps the first host that answers: the standby.
    plain = multi_host_url([standby, primary])
    with connect(plain) as conn:
        assert where(conn) == (standby.port, True)
    replication = open_replication_connection(plain)
    try:
        assert where(replication) == (standby.port, True)
    finally:
        replication.close()


@pytest.mark.local_pg
def test_no_host_taking_writes_is_said_host_by_host(pair):
    primary, standby = pair
    url = multi_host_url([standby, primary], target_session_attrs="read-write")
    primary.stop("immediate")
    with pytest.raises(Exception) as failed:
        open_replication_connection(url)
    text = str(failed.value)
    assert "cannot open the replication connection: no host would do (" in text
    assert f"127.0.0.1:{standby.port}: session is read-only" in text
    assert f"127.0.0.1:{primary.port}: Connection refused" in text


def test_the_pool_is_back_within_a_second_of_the_database(pg: PgClientMixin):
    """psycopg_pool doubles its reconnection delay (1, 2, 4 s, ...): 4 s into an outage its
    next attempt would come at about 7 s. The relay's pool tries every second."""
    assert isinstance(pg, PostgresServer)
    with TcpProxy(pg.host, pg.port) as proxy:
        url = pg.url().replace(f"@{pg.host}:{pg.port}/", f"@127.0.0.1:{proxy.port}/")
        pool = open_pool(url)
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            # That request grew the pool to its two connections: both idle before the outage.
            wait_until(lambda: pool.get_stats()["pool_available"] == 2, 30)
            proxy.cut(refuse=True)
            down = time.monotonic()
            with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
                conn.execute("SELECT 1")  # the idle connection broke: the pool finds out
            wait_until(lambda: time.monotonic() - down >= 4, 10, interval=0.1)
            proxy.restore()
            with pool.connection(timeout=2) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pool.close()


@pytest.mark.compat
@pytest.mark.local_pg
@pytest.mark.pg_restart
def test_without_failover_slots_a_failover_halts_on_the_missing_slot(pair, kafka: str):
    primary, standby = pair
    primary.create_database("nofo_app")
    url = multi_host_url([primary, standby], "nofo_app", target_session_attrs="read-write")
    # PostgreSQL 15 and 16 have no failover slots; on 17+ this slot is not one either.
    box = make_outbox(url, kafka, slot_failover="off")
    with RelayProcess(box.env) as relay:
        end = insert_events(primary.url(dbname="nofo_app"), count=50)
        wait_confirmed_past(primary.url(dbname="nofo_app"), end)
        primary.stop("immediate")
        standby.promote()
        code = relay.wait(120)
        log = relay.log()
    assert code == 1, log
    last = log.strip().splitlines()[-1]
    assert last.startswith(
        "cdc-relay: error: replication slot cdc_relay does not exist: run `cdc-relay setup`. "
        "The relay never creates it itself: if this server was just promoted in a failover"
    ), last
    assert "republished from the outbox table (README: Failover)" in last
    assert not slot_active(standby.url(dbname="nofo_app"))  # nothing re-created it
    status = cli({**box.env, "CDC_RELAY_DATABASE_URL": url}, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert "(primary)" in status.stdout and "slot          missing" in status.stdout
