"""What differs between PostgreSQL versions, on real servers: the supported range, invalidated
slots and why (invalidation_reason, 18's idle timeout), schema publications, status exit codes,
how an ended replication session is reported, and the connections' TCP keepalives."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import psycopg
import pytest

from cdc_relay.adapters.database import open_pool
from cdc_relay.adapters.replication import ReplicationStream, open_replication_connection
from cdc_relay.core.lsn import Lsn
from cdc_relay.errors import ReplicationError, SlotInvalidated
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    execute,
    insert_events,
    query,
    relay_env,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import PostgresServer, wait_until

PATCHED_VERSION = """
import sys
from cdc_relay.ops import admin
admin.server_version = lambda conn: int(sys.argv[1])
from cdc_relay.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def cli_on_version(env: dict[str, str], version_num: int, *args: str):
    """The command as users run it, with the server's reported version replaced: there is no
    PostgreSQL 14 or 19 to test against here."""
    return subprocess.run(
        [sys.executable, "-c", PATCHED_VERSION, str(version_num), *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
    )


@pytest.mark.compat
@pytest.mark.parametrize(("version_num", "shown"), [(140011, "14.11"), (190000, "19.0")])
def test_setup_and_run_refuse_a_server_outside_15_to_18(
    db: str, kafka: str, version_num: int, shown: str
):
    expected = (
        f"cdc-relay: error: PostgreSQL {shown} is not supported: cdc-relay supports "
        "PostgreSQL 15 to 18"
    )
    env = relay_env(db, kafka)
    setup = cli_on_version(env, version_num, "setup", "--create-table")
    assert setup.returncode == 1
    assert setup.stderr.strip() == expected
    assert query(db, "SELECT count(*) FROM pg_replication_slots")[0][0] == 0

    make_outbox(db, kafka)  # on the real version
    run = cli_on_version(env, version_num, "run")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == expected


# --------------------------------------------------------------------------- invalidated slots


@pytest.fixture
def small_wal_server() -> Iterator[PostgresServer]:
    """A server of its own that gives up a slot more than 1 MB behind: too harsh for the
    session server's other slots."""
    with PostgresServer(settings={"max_slot_wal_keep_size": "1MB"}) as server:
        yield server


def lose_the_slot(url: str) -> None:
    """Push the slot's WAL out of max_slot_wal_keep_size: segments switched and checkpointed."""

    def lost() -> bool:
        execute(
            url, "INSERT INTO outbox_filler SELECT repeat('x', 1000) FROM generate_series(1, 200)"
        )
        execute(url, "SELECT pg_switch_wal()")
        execute(url, "CHECKPOINT")
        return query(url, "SELECT wal_status FROM pg_replication_slots")[0][0] == "lost"

    execute(url, "CREATE TABLE outbox_filler (pad text)")
    wait_until(lost, 60, interval=0.05, message="the slot did not become lost")


@pytest.mark.compat
def test_a_slot_whose_wal_was_removed_is_named_lost_by_run_status_and_the_stream(
    small_wal_server: PostgresServer, kafka: str
):
    url = small_wal_server.create_database("lost")
    box = make_outbox(url, kafka)
    lose_the_slot(url)

    with RelayProcess(box.env) as relay:
        assert relay.wait(60) == 1
        last = relay.log().strip().splitlines()[-1]
    assert "replication slot cdc_relay is lost (wal_status = lost" in last
    assert "invalidation_reason = wal_removed" in last
    assert "the server removed WAL it still needed" in last

    status = cli(box.env, "status")
    assert status.returncode == 4, status.stdout + status.stderr
    assert "  invalid     wal_removed: the server removed WAL it still needed" in status.stdout
    assert json.loads(cli(box.env, "status", "--json").stdout)["health"] == "lost"

    # START_REPLICATION itself (a slot invalidated after the relay's checks): the message text
    # differs between versions; the slot's state does not.
    stream = ReplicationStream.connect(url)
    try:
        with pytest.raises(SlotInvalidated) as caught:
            stream.start(slot="cdc_relay", publication="cdc_relay", start_lsn=Lsn(0))
    finally:
        stream.close()
    assert caught.value.reason == "wal_removed"


@pytest.mark.min_pg(18)
def test_an_idle_timeout_invalidation_is_not_called_removed_wal(kafka: str):
    # idle_replication_slot_timeout is in seconds on 18; its invalidation runs at checkpoints.
    with PostgresServer(settings={"idle_replication_slot_timeout": "1s"}) as server:
        url = server.create_database("idle")
        box = make_outbox(url, kafka)

        def invalidated() -> bool:
            execute(url, "CHECKPOINT")
            rows = query(url, "SELECT invalidation_reason FROM pg_replication_slots")
            return rows[0][0] == "idle_timeout"

        wait_until(invalidated, 30, interval=0.2, message="the idle slot was not invalidated")
        with RelayProcess(box.env) as relay:
            assert relay.wait(60) == 1
            last = relay.log().strip().splitlines()[-1]
        assert "invalidation_reason = idle_timeout" in last
        assert "inactive for longer than idle_replication_slot_timeout" in last
        assert "removed WAL" not in last

        status = cli(box.env, "status")
        assert status.returncode == 4
        assert "  invalid     idle_timeout: it was inactive for longer" in status.stdout

        # 18's own text for it ("can no longer access replication slot") is a lost slot too.
        conn = open_replication_connection(url)
        try:
            res = conn.pgconn.exec_(
                b"START_REPLICATION SLOT cdc_relay LOGICAL 0/0 "
                b"(proto_version '1', publication_names 'cdc_relay')"
            )
            message = (res.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()
        finally:
            conn.close()
        assert "can no longer access replication slot" in message
        stream = ReplicationStream.connect(url)
        try:
            with pytest.raises(SlotInvalidated) as caught:
                stream.start(slot="cdc_relay", publication="cdc_relay", start_lsn=Lsn(0))
        finally:
            stream.close()
        assert caught.value.reason == "idle_timeout"


# --------------------------------------------------------------------------- publications


@pytest.mark.compat
def test_a_publication_for_the_outbox_schema_covers_it(db: str, kafka: str):
    execute(db, "CREATE SCHEMA app")
    execute(db, "CREATE PUBLICATION cdc_relay FOR TABLES IN SCHEMA app WITH (publish = 'insert')")
    box = make_outbox(db, kafka, outbox_table="app.outbox")
    again = cli(box.env, "setup")
    assert "ok    publication cdc_relay includes app.outbox" in again.stdout
    with RelayProcess(box.env) as relay:
        end = insert_events(db, count=20, per_txn=5, table="app.outbox")
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
    assert len(consume_all(kafka, [box.topic()], expected=20, timeout=60)) == 20

    other = relay_env(db, kafka, outbox_table="public.outbox", publication_name="cdc_relay")
    refused = cli(other, "setup", "--create-table")
    assert refused.returncode == 1
    assert "publication cdc_relay exists but does not include public.outbox" in refused.stderr


# --------------------------------------------------------------------------- status exit codes


@pytest.mark.compat
def test_status_exits_3_until_set_up_and_0_when_healthy(db: str, kafka: str):
    env = relay_env(db, kafka)
    before = cli(env, "status")
    assert before.returncode == 3, before.stdout + before.stderr
    assert "slot          missing (run `cdc-relay setup`)" in before.stdout
    as_json = cli(env, "status", "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["health"] == "not_set_up"
    box = make_outbox(db, kafka)
    assert cli(box.env, "status").returncode == 0
    execute(db, "DROP PUBLICATION cdc_relay")
    assert cli(box.env, "status").returncode == 3


# --------------------------------------------------------------------------- the connection


@pytest.mark.compat
def test_a_terminated_walsender_is_reported_with_the_servers_message(db: str, kafka: str):
    make_outbox(db, kafka)
    stream = ReplicationStream.connect(db)
    try:
        stream.start(slot="cdc_relay", publication="cdc_relay", start_lsn=Lsn(0))
        wait_until(lambda: query(db, "SELECT active FROM pg_replication_slots")[0][0], 30)
        execute(db, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")

        def ended() -> ReplicationError | None:
            try:
                while stream.read() is not None:
                    pass
                stream.wait(0.2)
            except ReplicationError as exc:
                return exc
            return None

        error = wait_until(ended, 30, interval=0.01)
    finally:
        stream.close()
    text = str(error)
    assert "no detail" not in text
    assert "terminating connection due to administrator command" in text, text


@pytest.mark.compat
def test_replication_and_pool_connections_have_tcp_keepalives_unless_the_url_sets_them(db: str):
    def options(conn: psycopg.Connection) -> dict[str, str]:
        return {
            o.keyword.decode(): (o.val or b"").decode()
            for o in conn.pgconn.info
            if o.keyword.decode().startswith(("keepalives", "tcp_user_timeout"))
        }

    conn = open_replication_connection(db)
    try:
        assert options(conn) == {
            "keepalives": "1",
            "keepalives_idle": "15",
            "keepalives_interval": "5",
            "keepalives_count": "3",
            "tcp_user_timeout": "30000",
        }
    finally:
        conn.close()
    conn = open_replication_connection(db + "?keepalives_idle=7&tcp_user_timeout=0")
    try:
        got = options(conn)
    finally:
        conn.close()
    assert got["keepalives_idle"] == "7" and got["tcp_user_timeout"] == "0"
    assert got["keepalives_count"] == "3"
    with open_pool(db) as pool, pool.connection() as pooled:
        assert options(pooled)["keepalives_idle"] == "15"
