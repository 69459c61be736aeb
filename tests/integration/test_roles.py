"""sql/roles.sql: `setup` works with the setup role, `run` streams with a role that has
REPLICATION and no privilege on the outbox table at all, `prune` with SELECT and DELETE."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_relay import recipes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    current_lsn,
    execute,
    insert_events,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all
from tests.servers import PgClientMixin

ROLES = ("cdc_relay_setup", "cdc_relay_run")


@pytest.fixture
def roles(pg: PgClientMixin, db: str) -> Iterator[dict[str, str]]:
    """The roles of sql/roles.sql in the test database; their URLs by name."""
    dbname = str(conninfo_to_dict(db)["dbname"])
    execute(db, recipes.read("roles.sql"))
    execute(db, recipes.read("roles.sql"))  # idempotent
    for role in ROLES:
        execute(db, f"ALTER ROLE {role} PASSWORD 'pw-{role}'")
    try:
        yield {role: pg.url(user=role, password=f"pw-{role}", dbname=dbname) for role in ROLES}
    finally:
        execute(
            db,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = current_database() AND NOT active",
        )
        # One at a time: together, PostgreSQL 15 trips over the default ACL that names both.
        execute(db, "DROP OWNED BY cdc_relay_run")
        execute(db, "DROP OWNED BY cdc_relay_setup")
        execute(db, "DROP ROLE cdc_relay_setup, cdc_relay_run")


def test_setup_and_run_need_no_superuser(roles: dict[str, str], db: str, kafka: str):
    assert query(db, "SELECT bool_or(rolsuper) FROM pg_roles WHERE rolname LIKE 'cdc_relay_%'") == [
        (False,)
    ]
    outbox = make_outbox(roles["cdc_relay_setup"], kafka)  # setup --create-table
    assert query(db, "SELECT tableowner FROM pg_tables WHERE tablename = 'outbox'") == [
        ("cdc_relay_setup",)
    ]
    # Streaming needs no privilege on the table: take away even what prune needs.
    execute(db, "REVOKE ALL ON outbox FROM cdc_relay_run")
    run_env = {**outbox.env, "CDC_RELAY_DATABASE_URL": roles["cdc_relay_run"]}
    insert_events(db, count=20)
    with RelayProcess(run_env) as relay:
        assert len(consume_all(kafka, [outbox.topic()], expected=20, timeout=60)) == 20
        wait_confirmed_past(db, current_lsn(db))

        denied = cli(run_env, "prune", "--older-than", "0s")
        assert denied.returncode == 1
        assert "permission denied" in denied.stderr
        execute(db, "GRANT SELECT, DELETE ON outbox TO cdc_relay_run")
        pruned = cli(run_env, "prune", "--older-than", "0s")
        assert pruned.returncode == 0, pruned.stderr
        assert "deleted 20 confirmed rows" in pruned.stdout
        assert relay.stop() == 0, relay.log()

    torn = cli(outbox.env, "teardown", "--yes")
    assert torn.returncode == 0, torn.stderr
    assert query(db, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_relay'") == [
        (0,)
    ]
