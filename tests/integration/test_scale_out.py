"""Scaling out past one slot (sql/outbox_hash.sql): a hash-partitioned outbox, one relay per
partition, each on its own slot and publication, all onto the same topic. Concurrent writers
touch many aggregates, several per transaction; one relay is restarted while the writers run.
Every event arrives, each relay publishes exactly its partition's events, per-key order holds,
and the other relay streams on undisturbed; prune goes per partition."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg

from cdc_relay import recipes
from tests.integration.relay_process import (
    RelayProcess,
    cli,
    confirmed_lsn,
    current_lsn,
    query,
    relay_env,
    slot_active,
    wait_confirmed_past,
)
from tests.kafka_helpers import consume_all, create_topic
from tests.servers import wait_until

PARTITIONS = 2
AGGREGATES = 200
WRITERS = 3
PUBLISHED = re.compile(r"stopped slot=\S+ confirmed lsn=\S+ published=(\d+)")

# One transaction: bump the sequence of each of its aggregates and write one event for each.
# The row lock on agg_seq is held until COMMIT, so for every aggregate the order of `seq` is
# the order in which its events' transactions committed.
WRITE = """
WITH bumped AS (
    UPDATE agg_seq SET n = n + 1 WHERE aggregate_id = ANY(%s) RETURNING aggregate_id, n
)
INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
SELECT gen_random_uuid(), 'order', aggregate_id, 'Tested',
       jsonb_build_object('seq', n, 'pad', repeat('x', 100))
FROM bumped
"""


def partition(i: int) -> str:
    return f"outbox_p{i}"


def create_hash_outbox(url: str, partitions: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET cdc_relay.partitions = {int(partitions)}")
        conn.execute(recipes.read("outbox_hash.sql"))
        conn.execute("CREATE TABLE agg_seq (aggregate_id text PRIMARY KEY, n int NOT NULL)")
        conn.execute(
            "INSERT INTO agg_seq SELECT 'a-' || i, 0 FROM generate_series(0, %s) AS i",
            (AGGREGATES - 1,),
        )


@dataclass
class Writers:
    """Writer threads, each committing transactions of 1 to 4 random aggregates until told to
    stop; deadlocks between them are retried (the rolled-back transaction wrote nothing)."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    committed: Counter[int] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Writers:
        for n in range(WRITERS):
            thread = threading.Thread(target=self._write, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _write(self, n: int) -> None:
        rng = random.Random(n)
        try:
            with psycopg.connect(self.url) as conn:
                while not self.stop.is_set():
                    aggregates = sorted(
                        f"a-{i}" for i in rng.sample(range(AGGREGATES), rng.randint(1, 4))
                    )
                    try:
                        with conn.transaction():
                            conn.execute(WRITE, (aggregates,))
                    except psycopg.errors.DeadlockDetected:
                        continue
                    self.committed[n] += 1
                    time.sleep(0.002)  # a service's pace, not a bulk load
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)

    def total(self) -> int:
        return sum(self.committed.values())

    def wait_for(self, transactions: int, timeout: float = 30) -> None:
        """Until ``transactions`` more have committed."""
        target = self.total() + transactions
        wait_until(lambda: self.errors or self.total() >= target, timeout)
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors


def published(relay: RelayProcess) -> list[int]:
    """The `published=` count of every clean stop in the relay's log."""
    return [int(n) for n in PUBLISHED.findall(relay.log())]


def test_two_relays_on_two_slots_share_a_hash_partitioned_outbox(db: str, kafka: str):
    started = time.monotonic()
    create_hash_outbox(db, PARTITIONS)
    prefix = f"t{random.getrandbits(40):010x}"
    topic = f"{prefix}.order"
    create_topic(kafka, topic, partitions=3)
    envs = [
        relay_env(
            db,
            kafka,
            outbox_table=f"public.{partition(i)}",
            slot_name=f"cdc_relay_p{i}",
            publication_name=f"cdc_relay_p{i}",
            topic_template=f"{prefix}.{{aggregate_type}}",
            dead_letter_topic=f"{prefix}.dead-letter",
        )
        for i in range(PARTITIONS)
    ]
    for i, env in enumerate(envs):
        done = cli(env, "setup")
        assert done.returncode == 0, done.stderr
        assert f"hash partition {i} of {PARTITIONS} of public.outbox" in done.stdout
    # Once the last partition is set up, none is left without a publication.
    assert "in no publication yet" not in done.stdout
    assert query(
        db,
        "SELECT pubname, string_agg(tablename, ',') FROM pg_publication_tables "
        "WHERE pubname LIKE 'cdc_relay_p%%' GROUP BY 1 ORDER BY 1",
    ) == [(f"cdc_relay_p{i}", partition(i)) for i in range(PARTITIONS)]

    steady, restarted = RelayProcess(envs[0]), RelayProcess(envs[1])
    second: RelayProcess | None = None
    writers = Writers(db)
    try:
        steady.start()
        restarted.start()
        for i in range(PARTITIONS):
            wait_until(lambda i=i: slot_active(db, f"cdc_relay_p{i}"), 30, message=f"p{i} idle")
        writers.start()
        writers.wait_for(100)

        # Restart one relay while the writers go on: the other keeps streaming meanwhile.
        assert restarted.stop() == 0
        down_at = current_lsn(db)
        writers.wait_for(100)
        while_down = current_lsn(db)
        wait_confirmed_past(db, while_down, timeout=30, slot="cdc_relay_p0")
        assert not slot_active(db, "cdc_relay_p1")
        second = RelayProcess(envs[1]).start()
        writers.wait_for(100)
        writers.finish()

        end = current_lsn(db)
        for i in range(PARTITIONS):
            wait_confirmed_past(db, end, timeout=30, slot=f"cdc_relay_p{i}")
        rows = query(db, "SELECT id::text, aggregate_id, tableoid::regclass::text FROM outbox")

        # Prune goes per partition, with its relay's settings; through the root with one
        # partition's slot it would trust that slot for the other's rows, and refuses.
        root = {**envs[1], "CDC_RELAY_OUTBOX_TABLE": "public.outbox"}
        refused = cli(root, "prune", "--older-than", "0s")
        assert refused.returncode != 0
        assert "publication cdc_relay_p1 does not carry public.outbox" in refused.stderr
        pruned = cli(envs[0], "prune", "--older-than", "0s", "--wait", "30s")
        assert pruned.returncode == 0, pruned.stderr
        left = dict(query(db, "SELECT tableoid::regclass::text, count(*) FROM outbox GROUP BY 1"))
        assert left == {partition(1): sum(1 for row in rows if row[2] == partition(1))}
        assert steady.stop() == 0
        assert second.stop() == 0
    finally:
        writers.stop.set()
        for relay in (steady, restarted, second):
            if relay is not None:
                relay.kill()

    share = {row[0]: row[2] for row in rows}
    counts = Counter(share.values())
    assert set(counts) == {partition(i) for i in range(PARTITIONS)}, counts
    records = consume_all(kafka, [topic], expected=len(rows), timeout=60)

    # Nothing lost, nothing foreign: exactly the outbox's events, with their own keys.
    ids = [(r.header("id") or b"").decode() for r in records]
    assert set(ids) == set(share)
    by_id = {row[0]: row for row in rows}
    assert all((r.key or b"").decode() == by_id[i][1] for r, i in zip(records, ids, strict=True))

    # Each relay published exactly its partition's events: the relay that never restarted
    # published each of p0's events once and nothing else; the restarted one, over its two
    # runs, every record of p1's events that Kafka holds (a restart may resend some).
    copies = Counter(ids)
    kafka_share = Counter(share[i] for i in ids)
    assert published(steady) == [counts[partition(0)]]
    assert all(copies[i] == 1 for i in ids if share[i] == partition(0))
    assert kafka_share[partition(0)] == counts[partition(0)]
    assert second is not None
    assert sum(published(restarted) + published(second)) == kafka_share[partition(1)]
    # ... and it streamed on while the other was down: one session, no reconnects.
    assert steady.log().count("stopped slot=") == 1
    assert "reconnecting" not in steady.log()

    # Per key: one Kafka partition, first occurrences in commit order (seq 1, 2, 3, ...).
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    kafka_partitions: dict[str, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        key = (r.key or b"").decode()
        kafka_partitions[key].add(r.partition)
        event = (r.header("id") or b"").decode()
        if event not in seen:
            seen.add(event)
            firsts[key].append(json.loads(r.value or b"{}")["seq"])
    assert all(len(p) == 1 for p in kafka_partitions.values())
    for key, seqs in firsts.items():
        assert seqs == list(range(1, len(seqs) + 1)), key
    print(
        f"scale-out: {len(rows)} events ({dict(sorted(counts.items()))}) from "
        f"{writers.total()} transactions of {WRITERS} writers, {len(records)} records "
        f"({len(records) - len(rows)} resent after the restart), LSN while down "
        f"{down_at:X}..{while_down:X}, {time.monotonic() - started:.1f} s"
    )


def test_a_publication_over_several_partitions_is_refused_by_setup_and_run(db: str, kafka: str):
    """The relay maps one table: the other partitions' rows in its stream would be confirmed
    without being published, so neither setup nor run accepts such a publication."""
    create_hash_outbox(db, 2)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE PUBLICATION both_parts FOR TABLE outbox_p0, outbox_p1 WITH (publish = 'insert')"
        )
        conn.execute("SELECT pg_create_logical_replication_slot('cdc_relay_p0', 'pgoutput')")
    env = relay_env(
        db, kafka, outbox_table="public.outbox_p0", slot_name="cdc_relay_p0",
        publication_name="both_parts",
    )  # fmt: skip
    refusal = "publication both_parts carries public.outbox_p1 besides public.outbox_p0"
    done = cli(env, "setup")
    assert done.returncode == 1 and refusal in done.stderr, done.stderr
    ok = cli({**env, "CDC_RELAY_PUBLICATION_NAME": "cdc_relay_p0"}, "setup")
    assert ok.returncode == 0, ok.stderr  # the control tables, for run's own checks
    with RelayProcess(env) as relay:
        assert relay.wait(60) == 1
        assert refusal in relay.log()


def test_one_relay_on_the_root_splits_into_one_per_partition_without_a_gap(db: str, kafka: str):
    """The growth path of the README: one relay on the hash-partitioned root (published via
    the root), then, while writers go on, a slot per partition, the root relay stopped once it
    has confirmed past them, the partition relays started. Nothing is lost, and the first
    arrival of each event keeps every aggregate's commit order."""
    create_hash_outbox(db, PARTITIONS)
    prefix = f"t{random.getrandbits(40):010x}"
    topic = f"{prefix}.order"
    create_topic(kafka, topic, partitions=3)
    common = {"topic_template": f"{prefix}.{{aggregate_type}}", "dead_letter_topic": f"{prefix}.dl"}
    root_env = relay_env(
        db, kafka, outbox_table="public.outbox", slot_name="cdc_relay_root",
        publication_name="cdc_relay_root", **common,
    )  # fmt: skip
    envs = [
        relay_env(
            db,
            kafka,
            outbox_table=f"public.{partition(i)}",
            slot_name=f"cdc_relay_p{i}",
            publication_name=f"cdc_relay_p{i}",
            **common,
        )
        for i in range(PARTITIONS)
    ]
    assert cli(root_env, "setup").returncode == 0
    root = RelayProcess(root_env)
    relays = [RelayProcess(env) for env in envs]
    writers = Writers(db)
    try:
        root.start()
        wait_until(lambda: slot_active(db, "cdc_relay_root"), 30, message="root idle")
        writers.start()
        writers.wait_for(100)
        for env in envs:  # while the root relay streams
            done = cli(env, "setup")
            assert done.returncode == 0, done.stderr
            assert "publication cdc_relay_root also carries" in done.stdout
        starts = [confirmed_lsn(db, f"cdc_relay_p{i}") for i in range(PARTITIONS)]
        writers.wait_for(50)
        wait_confirmed_past(db, max(starts), timeout=30, slot="cdc_relay_root")
        assert root.stop() == 0
        for relay in relays:
            relay.start()
        writers.wait_for(100)
        writers.finish()
        end = current_lsn(db)
        for i in range(PARTITIONS):
            wait_confirmed_past(db, end, timeout=30, slot=f"cdc_relay_p{i}")
        for relay in relays:
            assert relay.stop() == 0
    finally:
        writers.stop.set()
        for relay in (root, *relays):
            relay.kill()
    assert cli(root_env, "teardown", "--yes").returncode == 0
    status = cli(envs[0], "status")
    assert "also carries" not in status.stdout and "in no publication" not in status.stdout

    ids = {row[0] for row in query(db, "SELECT id::text FROM outbox")}
    records = consume_all(kafka, [topic], expected=len(ids), timeout=60)
    assert {(r.header("id") or b"").decode() for r in records} == ids
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = (r.header("id") or b"").decode()
        if event not in seen:
            seen.add(event)
            firsts[(r.key or b"").decode()].append(json.loads(r.value or b"{}")["seq"])
    for key, seqs in firsts.items():
        assert seqs == list(range(1, len(seqs) + 1)), key
    print(f"split: {len(ids)} events, {len(records) - len(ids)} published twice at the cut-over")
