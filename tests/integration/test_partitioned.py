"""The time-partitioned outbox recipe (sql/outbox_partitioned.sql) streams through the relay
(publish_via_partition_root), and dropping an old day's partition publishes nothing."""

from __future__ import annotations

import psycopg

from cdc_relay import recipes
from tests.integration.conftest import make_outbox
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    current_lsn,
    execute,
    query,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all

INSERT = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) "
    "VALUES (gen_random_uuid(), 'order', %s, 'OrderPlaced', jsonb_build_object('n', %s), "
    "now() - make_interval(days => %s))"
)


def partitions(url: str) -> list[str]:
    rows = query(
        url,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'public.outbox'::regclass ORDER BY 1",
    )
    return [row[0] for row in rows]


def test_the_partitioned_outbox_streams_and_old_partitions_drop_silently(db: str, kafka: str):
    execute(db, recipes.read("outbox_partitioned.sql"))
    assert len(partitions(db)) == 5  # yesterday, today and 3 days ahead
    outbox = make_outbox(db, kafka, create_table=False)
    assert query(db, "SELECT pubviaroot FROM pg_publication WHERE pubname = 'cdc_relay'") == [
        (True,)
    ]
    execute(
        db,
        "SELECT cdc_relay_outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 3, "
        "(now() AT TIME ZONE 'UTC')::date)",
    )
    with RelayProcess(outbox.env) as relay:
        # One transaction writing into three days' partitions, and one into today's.
        with psycopg.connect(db) as conn:
            for args in (("a-1", 1, 3), ("a-2", 2, 2), ("a-3", 3, 0)):
                conn.execute(INSERT, args)
        execute(db, INSERT, ("a-4", 4, 0))
        records = consume_all(kafka, [outbox.topic("order")], expected=4, timeout=60)
        assert sorted((r.key or b"").decode() for r in records) == ["a-1", "a-2", "a-3", "a-4"]
        wait_confirmed_past(db, current_lsn(db))

        dropped = query(db, "SELECT cdc_relay_outbox_drop_partitions(2)")
        assert [row[0].split()[0] for row in dropped] == ["dropped"]  # the day 3 days ago
        assert query(db, "SELECT aggregate_id FROM outbox ORDER BY 1") == [
            ("a-2",),
            ("a-3",),
            ("a-4",),
        ]
        # Pruning through the root works on partitions too.
        pruned = cli(outbox.env, "prune", "--older-than", "1d")
        assert pruned.returncode == 0, pruned.stderr
        assert "deleted 1 confirmed rows" in pruned.stdout

        # The relay keeps going: the next event is published, nothing else was.
        execute(db, INSERT, ("a-5", 5, 0))
        records = consume_all(kafka, [outbox.topic("order")], expected=5, timeout=60, linger=2)
        assert sorted((r.key or b"").decode() for r in records) == [
            "a-1",
            "a-2",
            "a-3",
            "a-4",
            "a-5",
        ]
        assert relay.running()
        assert relay.stop() == 0


def test_dropping_a_partition_before_the_relay_read_it_still_publishes_its_rows(
    db: str, kafka: str
):
    """The WAL, not the table, is the relay's source: a partition dropped while the relay was
    down still has its committed inserts delivered."""
    execute(db, recipes.read("outbox_partitioned.sql"))
    outbox = make_outbox(db, kafka, create_table=False)
    execute(
        db,
        "SELECT cdc_relay_outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 3, "
        "(now() AT TIME ZONE 'UTC')::date)",
    )
    execute(db, INSERT, ("old", 1, 3))
    execute(db, "SELECT cdc_relay_outbox_drop_partitions(2)")
    execute(db, INSERT, ("new", 2, 0))
    with RelayProcess(outbox.env) as relay:
        records = consume_all(kafka, [outbox.topic("order")], expected=2, timeout=60, linger=1)
        assert relay.stop() == 0
    assert sorted((r.key or b"").decode() for r in records) == ["new", "old"]
