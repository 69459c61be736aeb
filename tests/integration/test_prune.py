"""`cdc-relay prune` never deletes a row whose transaction the slot has not confirmed."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from cdc_relay.ops import prune as prune_module
from cdc_relay.settings import load_settings
from tests.integration.conftest import Outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    current_lsn,
    insert_events,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all


def count(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM outbox")[0][0])


def test_prune_deletes_nothing_the_relay_has_not_confirmed(outbox: Outbox, kafka: str):
    insert_events(outbox.url, count=10, per_txn=5)
    # The relay has not run: the slot sits before these rows, so even --older-than 0s keeps them.
    done = cli(outbox.env, "prune", "--older-than", "0s", "--wait", "1s")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("cdc-relay: error: nothing deleted: slot cdc_relay has confirmed")
    assert done.stderr.count("\n") == 1
    assert count(outbox.url) == 10

    with RelayProcess(outbox.env) as relay:
        assert len(consume_all(kafka, [outbox.topic()], expected=10, timeout=60)) == 10
        wait_confirmed_past(outbox.url, current_lsn(outbox.url))

        dry = cli(outbox.env, "prune", "--older-than", "0s", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would delete 10 confirmed rows" in dry.stdout
        assert count(outbox.url) == 10

        # The age margin: rows younger than --older-than stay even when confirmed.
        kept = cli(outbox.env, "prune", "--older-than", "1h")
        assert kept.returncode == 0, kept.stderr
        assert "deleted 0 confirmed rows" in kept.stdout
        assert count(outbox.url) == 10

        done = cli(outbox.env, "prune", "--older-than", "0s", "--batch-size", "3")
        assert done.returncode == 0, done.stderr
        assert "deleted 10 confirmed rows" in done.stdout
        assert "in 4 batches of at most 3" in done.stdout
        assert count(outbox.url) == 0
        assert relay.stop() == 0
    # Deletes publish nothing.
    assert len(consume_all(kafka, [outbox.topic()], expected=10, timeout=60, linger=1)) == 10


def test_a_transaction_open_when_prune_starts_keeps_its_rows(
    outbox: Outbox, kafka: str, monkeypatch: pytest.MonkeyPatch
):
    """A row inserted under a savepoint by a transaction that commits after prune's snapshot
    (so after the position prune waits for) is not deleted, even though it is old enough."""
    settings = load_settings(_env_file=None, **_settings_of(outbox))
    late = psycopg.connect(outbox.url)
    late.execute("SAVEPOINT s")  # the row's xmin is then a subtransaction id
    late.execute(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) "
        "VALUES (gen_random_uuid(), 'order', 'late', 'Late', '{}', now() - interval '2 days')"
    )
    late.execute("RELEASE SAVEPOINT s")
    insert_events(outbox.url, count=3)

    wait_for_slot = prune_module._wait_confirmed

    def commit_then_wait(*args, **kwargs):
        late.commit()  # commits after the snapshot: its commit lies beyond what prune waits for
        return wait_for_slot(*args, **kwargs)

    monkeypatch.setattr(prune_module, "_wait_confirmed", commit_then_wait)
    with RelayProcess(outbox.env) as relay:
        with psycopg.connect(outbox.url, autocommit=True) as conn:
            result = prune_module.prune(
                conn,
                settings,
                older_than=prune_module.parse_duration("1d"),
                batch_size=100,
                wait_seconds=60,
                dry_run=False,
                say=lambda _: None,
            )
        assert result.deleted == 0  # the 3 others are too young; 'late' committed too late
        assert query(outbox.url, "SELECT aggregate_id FROM outbox WHERE event_type = 'Late'") == [
            ("late",)
        ]
        assert len(consume_all(kafka, [outbox.topic()], expected=4, timeout=60)) == 4
        wait_confirmed_past(outbox.url, current_lsn(outbox.url))
        monkeypatch.undo()
        done = cli(outbox.env, "prune", "--older-than", "1d")
        assert done.returncode == 0, done.stderr
        assert "deleted 1 confirmed rows" in done.stdout
        assert relay.stop() == 0
    late.close()
    assert count(outbox.url) == 3


def _settings_of(outbox: Outbox) -> dict[str, str]:
    prefix = "CDC_RELAY_"
    return {k[len(prefix) :].lower(): v for k, v in outbox.env.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    ("next_xid", "xid", "widened"),
    [
        (1000, 999, 999),  # epoch 0
        ((5 << 32) | 100, 50, (5 << 32) | 50),  # same epoch
        ((5 << 32) | 100, 4_000_000_000, (4 << 32) | 4_000_000_000),  # previous epoch
        (100, 4_000_000_000, 4_000_000_000),  # never below epoch 0
    ],
)
def test_a_row_xmin_is_widened_into_the_right_epoch(db: str, next_xid: int, xid: int, widened: int):
    expression = prune_module.xid8_of(
        sql.SQL("{}::text::xid").format(sql.Literal(str(xid))), sql.Literal(next_xid)
    )
    assert query(db, sql.SQL("SELECT {}").format(expression).as_string(None)) == [(widened,)]


def test_deleting_and_reinserting_rows_republishes_them_with_the_same_ids(
    outbox: Outbox, kafka: str
):
    """The runbook's reconciliation after a lost slot or a failover."""
    insert_events(outbox.url, count=3, per_txn=3)
    with RelayProcess(outbox.env) as relay:
        first = consume_all(kafka, [outbox.topic()], expected=3, timeout=60)
        with psycopg.connect(outbox.url, autocommit=True) as conn:
            conn.execute(
                "WITH gap AS (DELETE FROM outbox WHERE created_at >= now() - interval '1 hour' "
                "RETURNING *) INSERT INTO outbox SELECT * FROM gap"
            )
        both = consume_all(kafka, [outbox.topic()], expected=6, timeout=60, linger=1)
        assert relay.stop() == 0
    ids = sorted((r.header("id") or b"").decode() for r in first)
    assert sorted((r.header("id") or b"").decode() for r in both) == sorted(ids * 2)
    assert count(outbox.url) == 3


def test_prune_keeps_a_row_whose_payload_never_reached_kafka(outbox: Outbox, kafka: str):
    """Bug 7: a row too large for Kafka goes to the dead-letter topic without its payload, so
    the outbox row is the only copy; prune deleted it."""
    insert_events(outbox.url, count=5, per_txn=5)
    big_id = query(
        outbox.url,
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (gen_random_uuid(), 'order', 'k-big', 'Big', "
        "jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024))) RETURNING id::text",
    )[0][0]
    insert_events(outbox.url, count=5, per_txn=5, start=5)
    with RelayProcess(outbox.env) as relay:
        wait_confirmed_past(outbox.url, current_lsn(outbox.url))
        dead = consume_all(kafka, [outbox.dead_letter_topic], expected=1, timeout=30)
        assert [r.header("id") for r in dead] == [big_id.encode()] and dead[0].value is None
        kept = query(outbox.url, "SELECT event_id, source_table FROM cdc_relay_kept")
        assert kept == [(big_id, "public.outbox")]
        done = cli(outbox.env, "prune", "--older-than", "0s")
        assert done.returncode == 0, done.stderr
        assert "deleted 10 confirmed rows" in done.stdout
        assert query(outbox.url, "SELECT id::text FROM outbox") == [(big_id,)]
        assert relay.stop() == 0
