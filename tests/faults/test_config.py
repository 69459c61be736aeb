"""Configuration and environment faults of `cdc-relay run`: one line, exit 1 or 2, no
traceback, no password. (tests/integration/test_cli.py covers the rest: wrong password, missing
slot, an unreachable broker at start, invalid CDC_RELAY_KAFKA_CONFIG, acks=1,
enable.idempotence=false.)"""

from __future__ import annotations

import uuid

from tests.integration.conftest import make_outbox
from tests.integration.relay_process import RelayProcess, execute, relay_env
from tests.integration.test_cli import PASSWORD
from tests.servers import PostgresServer


def assert_run_fails_with_one_line(env: dict[str, str], code: int, *fragments: str) -> str:
    with RelayProcess(env) as relay:
        assert relay.wait(90) == code, relay.log()
        log = relay.log()
    assert "Traceback" not in log, log
    assert PASSWORD not in log
    lines = [line for line in log.splitlines() if line.startswith("cdc-relay: error:")]
    assert len(lines) == 1, log
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_run_on_an_unknown_host(kafka: str):
    url = f"postgresql://postgres:{PASSWORD}@no-such-host.invalid:5432/postgres"
    assert_run_fails_with_one_line(relay_env(url, kafka), 1, "no-such-host.invalid")


def test_run_without_wal_level_logical(kafka: str):
    with PostgresServer(wal_level="replica") as server:
        # The slot cannot exist without wal_level = logical; `setup` explains the setting.
        assert_run_fails_with_one_line(
            relay_env(server.url(), kafka),
            1,
            "slot cdc_relay does not exist: run `cdc-relay setup`",
        )


def test_run_without_the_replication_right(pg, db: str, kafka: str):
    make_outbox(db, kafka)  # set up by a superuser; run by a role without REPLICATION
    role = f"app_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'role-pw-123'")
    try:
        url = db.replace(f"postgres:{PASSWORD}@", f"{role}:role-pw-123@")
        line = assert_run_fails_with_one_line(relay_env(url, kafka), 1, "REPLICATION")
        assert "role-pw-123" not in line
    finally:
        pg.execute(f"DROP ROLE {role}")


def test_run_without_the_publication(db: str, kafka: str):
    box = make_outbox(db, kafka)
    execute(db, "DROP PUBLICATION cdc_relay")
    assert_run_fails_with_one_line(box.env, 1, "publication cdc_relay does not exist")
