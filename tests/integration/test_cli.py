"""The commands as a user meets them: setup, status, teardown, and the errors they print."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    execute,
    query,
    relay_env,
    slot_active,
)
from tests.kafka_helpers import consume_all
from tests.servers import PostgresServer, free_port, wait_until

PASSWORD = "postgres-test-pw"  # the harness's superuser password: must never be printed


def assert_one_line_error(done, code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cdc-relay: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


@pytest.mark.compat
def test_setup_is_idempotent(db: str, kafka: str):
    env = relay_env(db, kafka)
    first = cli(env, "setup", "--create-table")
    assert first.returncode == 0, first.stderr
    assert "created table public.outbox" in first.stdout
    assert "created publication cdc_relay" in first.stdout
    assert "created logical replication slot cdc_relay" in first.stdout
    state = query(db, "SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots")
    second = cli(env, "setup", "--create-table")
    assert second.returncode == 0, second.stderr
    assert "nothing to change" in second.stdout
    assert "created" not in second.stdout
    assert (
        query(db, "SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots") == state
    )
    pubs = query(db, "SELECT pubname, pubinsert, pubupdate, pubdelete FROM pg_publication")
    assert pubs == [("cdc_relay", True, False, False)]


def test_setup_without_table_says_how_to_create_it(db: str, kafka: str):
    done = cli(relay_env(db, kafka), "setup")
    assert_one_line_error(done, 1, "table public.outbox does not exist", "--create-table")


def test_setup_names_a_missing_mapped_column(db: str, kafka: str):
    execute(db, "CREATE TABLE outbox (id uuid primary key, aggregate_type text, payload jsonb)")
    done = cli(relay_env(db, kafka), "setup")
    assert_one_line_error(done, 1, "'aggregate_id' (CDC_RELAY_COLUMN_AGGREGATE_ID)")


def test_debezium_style_outbox_works_without_renaming(db: str, kafka: str):
    execute(
        db,
        "CREATE TABLE outbox (id uuid primary key, aggregatetype varchar(255) not null, "
        "aggregateid varchar(255) not null, type varchar(255) not null, payload jsonb)",
    )
    box = make_outbox(
        db,
        kafka,
        create_table=False,
        column_aggregate_type="aggregatetype",
        column_aggregate_id="aggregateid",
        column_event_type="type",
    )
    event_id = uuid.uuid4()
    execute(
        db,
        "INSERT INTO outbox VALUES (%s, 'Customer', 'c-17', 'CustomerCreated', '{\"n\": 1}')",
        (event_id,),
    )
    with RelayProcess(box.env) as relay:
        records = consume_all(kafka, [box.topic("Customer")], expected=1, timeout=60)
        assert relay.stop() == 0
    assert len(records) == 1
    r = records[0]
    assert (r.key, r.value) == (b"c-17", b'{"n": 1}')
    assert r.header("id") == str(event_id).encode()
    assert r.header("event_type") == b"CustomerCreated"


def test_setup_explains_wal_level_replica():
    with PostgresServer(wal_level="replica") as server:
        env = relay_env(server.url(), "127.0.0.1:9")
        done = cli(env, "setup", "--create-table")
    assert_one_line_error(done, 1, "wal_level is 'replica'", "wal_level = logical", "restart")


def test_setup_needs_the_replication_right(pg, db: str, kafka: str):
    role = f"app_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'role-pw-123'")
    try:
        url = db.replace(f"postgres:{PASSWORD}@", f"{role}:role-pw-123@")
        done = cli(relay_env(url, kafka), "setup", "--create-table")
        assert_one_line_error(done, 1, f"role {role} lacks the REPLICATION attribute")
        assert "role-pw-123" not in done.stderr
    finally:
        pg.execute(f"DROP ROLE {role}")


def test_wrong_password_is_one_line_without_the_password(db: str, kafka: str):
    url = db.replace(PASSWORD, "not-the-password-42")
    done = cli(relay_env(url, kafka), "status")
    assert_one_line_error(done, 1, "password authentication failed")
    assert "not-the-password-42" not in done.stderr


def test_run_with_a_wrong_password_stops_with_one_line(db: str, kafka: str):
    url = db.replace(PASSWORD, "not-the-password-42")
    with RelayProcess(relay_env(url, kafka)) as relay:
        assert relay.wait(60) == 1
        output = relay.log()
    assert (
        "cdc-relay: error: cannot connect to the database: password authentication failed" in output
    )
    assert "not-the-password-42" not in output and "Traceback" not in output


def test_unknown_host_is_one_line(kafka: str):
    url = f"postgresql://postgres:{PASSWORD}@no-such-host.invalid:5432/postgres"
    done = cli(relay_env(url, kafka), "setup")
    assert_one_line_error(done, 1, "cannot connect to the database")


def test_run_without_slot_says_to_run_setup(db: str, kafka: str):
    execute(
        db,
        "CREATE TABLE outbox (id uuid primary key, aggregate_type text, "
        "aggregate_id text, event_type text, payload jsonb)",
    )
    with RelayProcess(relay_env(db, kafka)) as relay:
        assert relay.wait(60) == 1
        output = relay.log()
    assert "cdc-relay: error: replication slot cdc_relay does not exist" in output
    assert "cdc-relay setup" in output
    assert "Traceback" not in output


def test_run_waits_for_an_unreachable_broker_and_logs_it_once(db: str, kafka: str):
    box = make_outbox(db, kafka)
    env = {**box.env, "CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    with RelayProcess(env, "--debug") as relay:
        # Keep it waiting through several retries: still one warning, and the slot is left
        # free for a standby with a working broker.
        wait_until(lambda: relay.log().count("Kafka still unreachable") >= 3, 60)
        deadline_log = relay.log()
        assert not slot_active(db)
        assert relay.stop() == 0
        output = relay.log()
    warnings = [line for line in output.splitlines() if "WARNING" in line and "unreachable" in line]
    assert len(warnings) == 1, warnings
    assert PASSWORD not in output and PASSWORD not in deadline_log


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"CDC_RELAY_DATABASE_URL": None}, ["CDC_RELAY_DATABASE_URL is required"]),
        (
            {"CDC_RELAY_KAFKA_CONFIG": '{"sasl.password": "hunter2-secret",'},
            ["CDC_RELAY_KAFKA_CONFIG: is not valid JSON"],
        ),
        ({"CDC_RELAY_KAFKA_CONFIG": '{"acks": "1"}'}, ["CDC_RELAY_KAFKA_CONFIG", "acks"]),
        ({"CDC_RELAY_KAFKA_CONFIG": '{"enable.idempotence": false}'}, ["enable.idempotence"]),
        ({"CDC_RELAY_MAX_IN_FLIGHT_BYTES": "ten"}, ["CDC_RELAY_MAX_IN_FLIGHT_BYTES"]),
        (
            {"CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS": None},
            ["CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS is required"],
        ),
        (
            {"CDC_RELAY_KAFKA_CONFIG": '{"no.such.property": 1}'},
            ["CDC_RELAY_KAFKA_CONFIG", "no.such.property"],
        ),
        # Bug 5: an illegal topic name from the template passed, then every event was
        # dead-lettered while the slot moved on.
        (
            {"CDC_RELAY_TOPIC_TEMPLATE": "outbox/{aggregate_type}"},
            ["CDC_RELAY_TOPIC_TEMPLATE", "illegal topic name 'outbox/order'"],
        ),
        ({"CDC_RELAY_KAFKA_CONFIG": '{"message.timeout.ms": 30000}'}, ["message.timeout.ms=0"]),
    ],
)
def test_configuration_errors_exit_2_with_one_line(db: str, kafka: str, env, fragments):
    full = relay_env(db, kafka)
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    done = cli(full, "run")
    assert_one_line_error(done, 2, *fragments)
    assert "hunter2-secret" not in done.stderr


def test_usage_error_exits_2():
    done = cli(relay_env("postgresql://x@127.0.0.1:9/x", None), "frobnicate")
    assert done.returncode == 2


def test_teardown_needs_yes_then_drops_slot_and_publication(db: str, kafka: str):
    env = relay_env(db, kafka)
    assert cli(env, "setup", "--create-table").returncode == 0
    assert_one_line_error(cli(env, "teardown"), 2, "--yes")
    done = cli(env, "teardown", "--yes")
    assert done.returncode == 0, done.stderr
    assert query(db, "SELECT count(*) FROM pg_replication_slots")[0][0] == 0
    assert query(db, "SELECT count(*) FROM pg_publication")[0][0] == 0
    again = cli(env, "teardown", "--yes")
    assert again.returncode == 0 and "does not exist" in again.stdout
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["slot"] is None and status["publication"]["tables"] is None


def test_password_never_appears_in_debug_logs(db: str, kafka: str):
    box = make_outbox(db, kafka)
    with RelayProcess(box.env, "--debug") as relay:
        wait_until(lambda: slot_active(db), 30)
        execute(
            db,
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (gen_random_uuid(), 'order', 'k', 'T', '{}')",
        )
        # Delivered, so the debug log covers a whole event's path.
        assert len(consume_all(kafka, [box.topic()], expected=1, timeout=30)) == 1
        assert relay.stop() == 0
        output = relay.log()
    assert "DEBUG" in output
    assert PASSWORD not in output


def test_a_partitioned_outbox_streams_through_its_root(db: str, kafka: str):
    execute(
        db,
        "CREATE TABLE outbox (id uuid, aggregate_type text NOT NULL, aggregate_id text NOT NULL,"
        " event_type text NOT NULL, payload jsonb NOT NULL, headers jsonb,"
        " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (id, created_at))"
        " PARTITION BY RANGE (created_at)",
    )
    execute(db, "CREATE TABLE outbox_all PARTITION OF outbox DEFAULT")
    box = make_outbox(db, kafka, create_table=False)
    assert query(db, "SELECT pubviaroot FROM pg_publication")[0][0] is True
    execute(
        db,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (gen_random_uuid(), 'order', 'k-1', 'T', '{}')",
    )
    with RelayProcess(box.env) as relay:
        records = consume_all(kafka, [box.topic()], expected=1, timeout=60)
        assert relay.stop() == 0
    assert [r.key for r in records] == [b"k-1"]
    # A publication without publish_via_partition_root would publish under the partitions'
    # names: the relay refuses to start rather than skip those events.
    execute(db, "ALTER PUBLICATION cdc_relay SET (publish_via_partition_root = false)")
    with RelayProcess(box.env) as relay:
        assert relay.wait(60) == 1
        assert "publish_via_partition_root" in relay.log()
    assert_one_line_error(cli(box.env, "setup"), 1, "publish_via_partition_root")
