"""What the fault scenarios share: concurrent writers that number each aggregate's events in
commit order, and the measurements (delivered ids, lost events, duplicates, per-key order,
status replies)."""

from __future__ import annotations

import itertools
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tests.integration.relay_process import SLOT, execute, lsn_int, query
from tests.kafka_helpers import ConsumedRecord, by_partition, consume_all

AGGREGATES = 200
PER_TXN = 10  # events (distinct aggregates) per transaction of the writers


@dataclass
class Txn:
    events: int
    commit_started: float  # monotonic, just before COMMIT
    end_upper: int  # pg_current_wal_lsn() after COMMIT: the commit ends at or before it


@dataclass
class Writers:
    """``threads`` connections inserting ``total`` events in transactions of PER_TXN distinct
    aggregates, paced to take about ``seconds``. A row lock on ``agg_seq`` orders writers of one
    aggregate, so each aggregate's ``seq`` (1, 2, 3, ...) is its commit order.

    ``reconnect``: ride through a failover: a lost connection is opened again (through the same,
    multi-host URL) until ``reconnect_timeout``; the transaction in flight then has an unknown
    outcome (counted in ``unknown``), and the writer goes on with the next one. ``acked_ids``
    holds the event ids of every transaction whose COMMIT returned."""

    url: str
    total: int
    threads: int
    seconds: float
    rng_seed: int
    reconnect: bool = False
    reconnect_timeout: float = 60.0
    txns: list[Txn] = field(default_factory=list)
    acked_ids: set[str] = field(default_factory=set)
    unknown: int = 0
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def prepare(url: str) -> None:
        """The per-aggregate counters the writers take their sequence numbers from."""
        execute(url, "CREATE TABLE agg_seq (agg int PRIMARY KEY, seq int NOT NULL DEFAULT 0)")
        execute(url, f"INSERT INTO agg_seq (agg) SELECT generate_series(0, {AGGREGATES - 1})")

    def start(self) -> Writers:
        self._threads = [
            threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for t in self._threads:
            t.start()
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Finish early: each writer stops after its current transaction."""
        self._stop.set()

    def join(self, timeout: float = 60) -> None:
        for t in self._threads:
            t.join(timeout)
        assert not self.alive(), "the writers did not finish"
        assert not self.errors, self.errors

    def committed(self) -> int:
        with self.lock:
            return sum(t.events for t in self.txns)

    def _connect(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + (self.reconnect_timeout if self.reconnect else 0)
        while True:
            try:
                return psycopg.connect(self.url, connect_timeout=5)
            except psycopg.OperationalError:
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise
                self._stop.wait(0.1)

    def run(self, index: int) -> None:
        rng = random.Random(self.rng_seed + index)
        share = self.total // self.threads + (index < self.total % self.threads)
        pace = self.seconds / max(1, share / PER_TXN)
        started = time.monotonic()
        done = 0
        conn: psycopg.Connection[Any] | None = None
        try:
            while done < share and not self._stop.is_set():
                if conn is None or conn.closed:
                    conn = self._connect()
                n = min(PER_TXN, share - done)
                aggregates = rng.sample(range(AGGREGATES), n)
                try:
                    with conn.transaction():
                        ids = conn.execute(
                            "WITH s AS (UPDATE agg_seq SET seq = seq + 1 "
                            "WHERE agg = ANY(%s) RETURNING agg, seq) "
                            "INSERT INTO outbox (id, aggregate_type, aggregate_id, "
                            "event_type, payload) SELECT gen_random_uuid(), 'order', "
                            "'a-' || s.agg, 'Tested', jsonb_build_object('seq', s.seq) "
                            "FROM s RETURNING id",
                            ([a for a in aggregates],),
                        ).fetchall()
                        commit_started = time.monotonic()
                    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                    assert row is not None
                    conn.commit()
                except psycopg.errors.DeadlockDetected:
                    conn.rollback()
                    continue  # rolled back: nothing inserted, try again
                except psycopg.OperationalError:
                    if not self.reconnect:
                        raise
                    # The server went away: this transaction may or may not have committed.
                    with self.lock:
                        self.unknown += 1
                    conn.close()
                    conn = None
                    continue
                with self.lock:
                    self.txns.append(Txn(n, commit_started, lsn_int(row[0])))
                    self.acked_ids.update(str(r[0]) for r in ids)
                done += n
                ahead = started + pace * (done / PER_TXN) - time.monotonic()
                if ahead > 0:
                    self._stop.wait(ahead)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()


def order_violations(
    records: list[ConsumedRecord], *, consecutive: bool
) -> list[tuple[bytes, list[int]]]:
    """Keys whose first occurrences (by payload ``seq``, in partition offset order) are not in
    commit order: 1, 2, 3, ... for the Writers (``consecutive``), or increasing for
    insert_events. Also a key on two partitions counts."""
    out: list[tuple[bytes, list[int]]] = []
    partitions_of: dict[bytes, set[tuple[str, int]]] = defaultdict(set)
    for where, recs in by_partition(records).items():
        seen: dict[bytes, list[int]] = defaultdict(list)
        for r in recs:
            seq = json.loads(r.value or b"")["seq"]
            partitions_of[r.key or b""].add(where)
            lst = seen[r.key or b""]
            if seq not in lst:
                lst.append(seq)
        for key, seqs in seen.items():
            good = (
                seqs == list(range(1, len(seqs) + 1))
                if consecutive
                else all(a < b for a, b in itertools.pairwise(seqs))
            )
            if not good:
                out.append((key, seqs[:20]))
    out += [(key, []) for key, where in partitions_of.items() if len(where) > 1]
    return out


def set_wal_sender_timeout(url: str, seconds: float) -> None:
    """A short wal_sender_timeout for the walsenders of this database: while Kafka is down the
    relay leaves the socket unread, and only its own status updates keep the connection."""
    dbname = url.rsplit("/", 1)[1]
    execute(url, f"ALTER DATABASE \"{dbname}\" SET wal_sender_timeout = '{seconds:g}s'")


def relay_warnings(log: str) -> list[str]:
    """The relay's distinct WARNING (and worse) messages, addresses and numbers blurred: what
    an operator saw of a fault."""
    seen: dict[str, None] = {}
    for line in log.splitlines():
        level = next((lv for lv in ("WARNING", "ERROR", "CRITICAL") if f" {lv} " in line), None)
        if level is None:
            continue
        text = line.split(f" {level} ", 1)[1].strip()
        text = re.sub(r"127\.0\.0\.1:\d+", "<broker>", text)
        text = re.sub(r"\d+(\.\d+)?", "N", text)
        seen[f"{level} {text}"] = None
    return list(seen)


def reply_time(url: str, slot: str = SLOT) -> Any:
    """The last status reply from the relay that holds ``slot``
    (pg_stat_replication.reply_time of the walsender streaming it). Matched by the slot's
    active_pid, not by application_name: the walsender of an earlier test's relay, still
    waiting for its wal_sender_timeout, carries the same name and a reply time that no longer
    moves."""
    rows = query(
        url,
        "SELECT r.reply_time FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
        (slot,),
    )
    return rows[0][0] if rows else None


def outbox_ids(url: str, table: str = "outbox") -> set[str]:
    return {str(row[0]) for row in query(url, f"SELECT id FROM {table}")}


def consume_ids(
    bootstrap: str, topics: list[str], expected: int, timeout: float = 120
) -> list[ConsumedRecord]:
    """Everything on ``topics``: at least ``expected`` records, and up to the high watermarks
    (duplicates included)."""
    return consume_all(bootstrap, topics, expected=expected, timeout=timeout)


def delivery_figures(records: list[ConsumedRecord], inserted: set[str]) -> tuple[int, int]:
    """(lost, duplicates) of the inserted ids among the consumed records (by header ``id``)."""
    counts = Counter((r.header("id") or b"").decode() for r in records)
    lost = len(inserted - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    return lost, duplicates


@dataclass(frozen=True)
class Delivered:
    """What reached Kafka of the outbox rows, measured from outside the relay."""

    inserted: set[str]
    records: list[ConsumedRecord]
    lost: int
    duplicates: int

    @property
    def figures(self) -> dict[str, int]:
        """The columns every scenario reports (results.record)."""
        return {"events": len(self.inserted), "lost": self.lost, "duplicates": self.duplicates}

    def seqs(self) -> set[int]:
        """The ``seq`` of every payload consumed (insert_events numbers them)."""
        return {json.loads(r.value or b"")["seq"] for r in self.records}


def measure_delivery(url: str, bootstrap: str, topic: str, timeout: float = 120) -> Delivered:
    """Every outbox id against everything consumed from ``topic``."""
    inserted = outbox_ids(url)
    records = consume_ids(bootstrap, [topic], expected=len(inserted), timeout=timeout)
    lost, duplicates = delivery_figures(records, inserted)
    return Delivered(inserted, records, lost, duplicates)
