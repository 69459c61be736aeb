"""Several outbox tables in one relay (one slot, one publication): routing by table, a table
with its own column mapping, metrics by table, and adding a table to a running deployment
without losing or duplicating an event."""

from __future__ import annotations

import json
import threading
import uuid
from collections import defaultdict

import psycopg

from tests.integration.relay_process import (
    RelayProcess,
    cli,
    current_lsn,
    execute,
    relay_env,
    wait_confirmed_past,
)
from tests.integration.test_observe import get, scrape
from tests.kafka_helpers import ConsumedRecord, consume_all
from tests.servers import free_port, wait_until

# billing.outbox is Debezium-shaped: other column names, no headers, no created_at.
BILLING_TABLE = """
CREATE SCHEMA billing;
CREATE TABLE billing.outbox (
    id text PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL,
    type text NOT NULL, payload text NOT NULL
)
"""
BILLING_COLUMNS = json.dumps(
    {
        "billing.outbox": {
            "aggregate_type": "aggregatetype",
            "aggregate_id": "aggregateid",
            "event_type": "type",
            "headers": "",
            "created_at": "",
        }
    }
)


def env_for(db: str, kafka: str, prefix: str, tables: str, **settings: object) -> dict[str, str]:
    return relay_env(
        db,
        kafka,
        outbox_table=tables,
        table_columns=BILLING_COLUMNS if "billing.outbox" in tables else "",
        topic_template=f"{prefix}.{{schema}}.{{table}}.{{aggregate_type}}",
        dead_letter_topic=f"{prefix}.dead-letter",
        **settings,
    )


def insert_public(conn: psycopg.Connection, key: str, seq: int) -> str:
    event_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (%s, 'order', %s, 'Step', %s)",
        (event_id, key, json.dumps({"seq": seq})),
    )
    return event_id


def insert_billing(conn: psycopg.Connection, key: str, seq: int) -> str:
    event_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO billing.outbox (id, aggregatetype, aggregateid, type, payload) "
        "VALUES (%s, 'invoice', %s, 'Billed', %s)",
        (event_id, key, json.dumps({"seq": seq})),
    )
    return event_id


def seq_of(record: ConsumedRecord) -> int:
    return int(json.loads(record.value or b"")["seq"])


def test_two_tables_route_by_table_with_their_own_mapping_and_metrics_by_table(db: str, kafka: str):
    prefix = f"t{uuid.uuid4().hex[:10]}"
    execute(db, BILLING_TABLE)
    port = free_port()
    env = env_for(db, kafka, prefix, "public.outbox,billing.outbox", http_port=port)
    done = cli(env, "setup", "--create-table")
    assert done.returncode == 0, done.stderr
    assert "created publication cdc_relay for public.outbox, billing.outbox" in done.stdout
    again = cli(env, "setup")
    assert again.returncode == 0 and "nothing to change: already set up" in again.stdout
    status = json.loads(cli(env, "status", "--json").stdout)
    assert [t["table"] for t in status["sources"]["tables"] if t["published"]] == [
        "public.outbox",
        "billing.outbox",
    ]
    ids: dict[str, tuple[str, int]] = {}
    with RelayProcess(env) as relay:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, message=relay.log)
        with psycopg.connect(db) as conn:
            for seq in range(30):
                # Both tables in one transaction, the same key: one order of events.
                ids[insert_public(conn, "k-1", seq)] = ("public", seq)
                ids[insert_billing(conn, "k-1", seq)] = ("billing", seq)
                if seq % 5 == 4:
                    conn.commit()
        end = current_lsn(db)
        topics = [f"{prefix}.public.outbox.order", f"{prefix}.billing.outbox.invoice"]
        records = consume_all(kafka, topics, expected=60, timeout=60, linger=1.0)
        wait_confirmed_past(db, end)

        def counted() -> bool:
            m = scrape(port)
            return (
                m.get(
                    (
                        "cdc_relay_events_published_total",
                        (("table", "billing.outbox"), ("topic", topics[1])),
                    )
                )
                == 30
                and m.get(
                    (
                        "cdc_relay_events_published_total",
                        (("table", "public.outbox"), ("topic", topics[0])),
                    )
                )
                == 30
            )

        wait_until(counted, 30, message=lambda: f"metrics: {scrape(port)}")
        assert relay.stop() == 0

    assert len(records) == 60
    for r in records:
        table, seq = ids[(r.header("id") or b"").decode()]
        assert r.topic == f"{prefix}.{table}.outbox.{'order' if table == 'public' else 'invoice'}"
        assert r.key == b"k-1" and seq_of(r) == seq
        assert r.header("event_type") == (b"Step" if table == "public" else b"Billed")
    for topic in topics:
        assert [seq_of(r) for r in records if r.topic == topic] == list(range(30))


def first_occurrences_in_commit_order(records: list[ConsumedRecord]) -> None:
    """Per key (and topic: each table routes to its own, read in parallel), the first
    occurrence of each event comes in commit order."""
    seen: set[bytes] = set()
    by_key: dict[tuple[str, bytes], list[int]] = defaultdict(list)
    for r in records:
        event = r.header("id") or b""
        if event in seen:
            continue
        seen.add(event)
        assert r.key is not None
        by_key[(r.topic, r.key)].append(seq_of(r))
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"key {key!r}: first occurrences out of commit order"


class Writer(threading.Thread):
    """Commits small transactions one after another (so commit order is seq order), into the
    tables it is told to use, until stopped; remembers the id of every committed event. Paced
    (a transaction every few ms), so that the backlog it builds while the relay is stopped
    stays one the relay drains in seconds on a loaded machine."""

    def __init__(self, db: str) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.tables = ["public"]
        self.committed: dict[str, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.seq = 0

    def run(self) -> None:
        try:
            with psycopg.connect(self.db) as conn:
                while not self.stop.is_set():
                    batch = {}
                    for _ in range(4):
                        key, seq = f"k-{self.seq % 7}", self.seq
                        for table in list(self.tables):
                            write = insert_public if table == "public" else insert_billing
                            batch[write(conn, key, seq)] = seq
                        self.seq += 1
                    conn.commit()
                    self.committed.update(batch)
                    self.stop.wait(0.005)
        except BaseException as exc:
            self.error = exc


def test_adding_a_table_to_a_running_deployment_loses_and_duplicates_nothing(db: str, kafka: str):
    """The documented procedure: stop the relay, `setup --create-table` with the longer list,
    start the relay with it. Writers of the first table keep writing throughout."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    old = env_for(db, kafka, prefix, "public.outbox")
    assert cli(old, "setup", "--create-table").returncode == 0
    writer = Writer(db)
    writer.start()
    try:
        with RelayProcess(old) as relay:
            wait_until(lambda: len(writer.committed) >= 200, 60, message=relay.log)
            wait_confirmed_past(db, current_lsn(db), timeout=120)  # streaming, writer going on
            assert relay.stop() == 0
        execute(db, BILLING_TABLE)
        new = env_for(db, kafka, prefix, "public.outbox,billing.outbox")
        added = cli(new, "setup", "--create-table")
        assert added.returncode == 0, added.stderr
        assert "done  added billing.outbox to publication cdc_relay" in added.stdout
        writer.tables = ["public", "billing"]  # the new table is written from here on
        with RelayProcess(new) as relay:
            before = len(writer.committed)
            wait_until(lambda: len(writer.committed) >= before + 400, 60, message=relay.log)
            writer.stop.set()
            writer.join(30)
            assert writer.error is None, writer.error
            end = current_lsn(db)
            wait_confirmed_past(db, end, timeout=180)
            assert relay.stop() == 0
    finally:
        writer.stop.set()
        writer.join(30)
    topics = [f"{prefix}.public.outbox.order", f"{prefix}.billing.outbox.invoice"]
    records = consume_all(kafka, topics, expected=len(writer.committed), timeout=90, linger=2)
    got = [(r.header("id") or b"").decode() for r in records]
    assert set(got) == set(writer.committed), "an event was lost"
    assert len(got) == len(set(got)), "an event arrived twice"
    assert any(r.topic == topics[1] for r in records)
    first_occurrences_in_commit_order(records)


def test_a_relay_that_does_not_list_a_table_added_to_its_publication_stops_before_its_rows(
    db: str, kafka: str
):
    """The other order: setup adds the table while the old relay runs. That relay stops at the
    new table's first row instead of passing over it; started with the list, it delivers it."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    old = env_for(db, kafka, prefix, "public.outbox")
    assert cli(old, "setup", "--create-table").returncode == 0
    execute(db, BILLING_TABLE)
    new = env_for(db, kafka, prefix, "public.outbox,billing.outbox")
    with RelayProcess(old) as relay:
        wait_until(lambda: get_active(db), 60, message=relay.log)
        added = cli(new, "setup")
        assert "stops before that table's first row" in added.stdout, added.stdout
        with psycopg.connect(db) as conn:
            first = insert_public(conn, "k", 0)
            billed = insert_billing(conn, "k", 1)
            conn.commit()
        assert relay.wait(60) == 1
        log = relay.log()
    assert "CDC_RELAY_OUTBOX_TABLE does not list" in log and "billing.outbox" in log
    with RelayProcess(new) as relay:
        end = current_lsn(db)
        wait_confirmed_past(db, end)
        assert relay.stop() == 0
    topics = [f"{prefix}.public.outbox.order", f"{prefix}.billing.outbox.invoice"]
    records = consume_all(kafka, topics, expected=2, timeout=60, linger=1)
    assert {(r.header("id") or b"").decode() for r in records} == {first, billed}


def get_active(db: str) -> bool:
    from tests.integration.relay_process import slot_active

    return slot_active(db)
