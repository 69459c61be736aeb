"""``python -m bench.scale_out``: what each extra replication slot costs PostgreSQL.

Every walsender reads and decodes the whole WAL, whatever its publication carries. This
streams one backlog through N slots at once (N of ``--slots``, default 1, 2 and 4), each with
the bare read loop of bench (a) in its own process, and reads every walsender's CPU time from
/proc/<pid>/stat: per slot and in total, per event of the backlog and per MB of its WAL. Each
N runs twice: every publication over the whole outbox, and each over 1/N of it (the
partitions of the hash-partitioned outbox, sql/outbox_hash.sql, as the scale-out recipe runs
them); and one slot whose publication carries none of it: the decoding alone. Writes its
table to docs/performance.md between the scale-out markers.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from bench import contenders, report
from bench.report import SlotCase, SlotRun
from bench.run import ROOT, fresh_broker, say, write_section
from bench.workload import Workload, fill_outbox
from cdc_relay import recipes
from tests.integration.relay_process import RelayProcess, cli, lsn_int, relay_env
from tests.kafka_servers import KafkaBroker
from tests.servers import PostgresServer, cpu_seconds

BEGIN_MARK = "<!-- scale-out:begin (written by python -m bench.scale_out; edit outside) -->"
END_MARK = "<!-- scale-out:end -->"
ORIGIN_SLOT = "scale_origin"
ALL = contenders.PUBLICATION  # the whole outbox, through its root: what stream_ceiling reads
NONE = "scale_none"  # a table nothing writes to
_XLOG_DATA, _KEEPALIVE = ord("w"), ord("k")
_COMMIT, _INSERT = ord("C"), ord("I")
_HEADER = 25  # 'w' + start LSN + end LSN + send time


@dataclass(frozen=True)
class Stream:
    """What one reader saw: its walsender's CPU seconds while streaming, and the Inserts."""

    walsender_cpu: float
    inserts: int


READERS = {
    "eager": "the bare loop of bench (a), one process per slot: a blocking read per frame",
    "cdc-relay": (
        "`cdc-relay run`, one per slot, as the scale-out recipe runs them (each slot's "
        "publication one partition, or one relay on the root), onto Apache Kafka"
    ),
}


def read_stream(url: str, slot: str, publication: str, end_lsn: int) -> Stream:
    """The bench (a) loop over one slot, until the walsender has decoded past ``end_lsn``: a
    Commit ending there, or, for a stream whose last transactions carried nothing of its
    publication (pgoutput skips empty transactions), the keepalive it sends once caught up,
    whose position is how far it has decoded. Runs in its own process."""
    inserts = 0
    conn = psycopg.connect(url, autocommit=True, replication="database")
    try:
        walsender = conn.info.backend_pid
        before = cpu_seconds(walsender)  # the backend's start-up and authentication
        pg = conn.pgconn
        pg.send_query(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0 "
            f"(proto_version '1', publication_names '{publication}')".encode()
        )
        result = pg.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(f"START_REPLICATION failed: {pg.get_error_message()}")
        while True:
            nbytes, data = pg.get_copy_data(0)
            if nbytes <= 0:
                raise RuntimeError(f"replication ended: {pg.get_error_message()}")
            if data[0] == _XLOG_DATA:
                kind = data[_HEADER]
                if kind == _INSERT:
                    inserts += 1
                elif (
                    kind == _COMMIT
                    and int.from_bytes(data[_HEADER + 10 : _HEADER + 18], "big") >= end_lsn
                ):
                    break
            elif data[0] == _KEEPALIVE and int.from_bytes(data[1:9], "big") >= end_lsn:
                break
        return Stream(cpu_seconds(walsender) - before, inserts)
    finally:
        conn.close()


def _read(args: tuple[str, str, str, int]) -> Stream:
    return read_stream(*args)


def _ready(_: int) -> int:
    return os.getpid()


@dataclass(frozen=True)
class Layout:
    """The database side of one case: N publications and what each carries."""

    slots: int
    covers: str
    publications: tuple[str, ...]
    # Each relay's CDC_RELAY_OUTBOX_TABLE, where cdc-relay can stream the layout: one relay on
    # the root, or one per partition. Empty for the others (a relay maps one table).
    tables: tuple[str, ...] = ()


def make_layouts(
    conn: psycopg.Connection[Any], slot_counts: list[int], partitions: int
) -> list[Layout]:
    """The publications of every case: over the whole outbox (one, shared by the N slots), over
    1/N of it (N publications of partitions/N partitions each), and over nothing."""
    layouts = []
    for n in slot_counts:
        root: tuple[str, ...] = ("public.outbox",) if n == 1 else ()
        layouts.append(Layout(n, "the whole outbox", (ALL,) * n, root))
    for n in slot_counts:
        if n == 1:
            continue
        names = []
        for k in range(n):
            name = f"scale_{n}_{k}"
            covered = ", ".join(f"public.outbox_p{p}" for p in range(k, partitions, n))
            conn.execute(f"CREATE PUBLICATION {name} FOR TABLE {covered} WITH (publish = 'insert')")
            names.append(name)
        per_relay = tuple(f"public.outbox_p{k}" for k in range(n)) if n == partitions else ()
        layouts.append(
            Layout(
                n,
                f"1/{n} of it ({partitions // n} of {partitions} partitions)",
                tuple(names),
                per_relay,
            )
        )
    layouts.append(Layout(1, "none of it (decoding only)", (NONE,)))
    return layouts


def run_case(
    pool: Any,
    conn: psycopg.Connection[Any],
    url: str,
    layout: Layout,
    end_lsn: int,
) -> SlotRun:
    slots = [contenders.copy_slot(conn, ORIGIN_SLOT) for _ in range(layout.slots)]
    try:
        started = time.perf_counter()
        streams: list[Stream] = pool.map(
            _read,
            [(url, s, p, end_lsn) for s, p in zip(slots, layout.publications, strict=True)],
        )
        seconds = time.perf_counter() - started
    finally:
        for slot in slots:
            contenders.drop_slot(conn, slot)
    return SlotRun(
        tuple(s.walsender_cpu for s in streams), tuple(s.inserts for s in streams), seconds
    )


_PUBLISHED = re.compile(r"published=(\d+)")


def run_relays(
    conn: psycopg.Connection[Any],
    url: str,
    bootstrap: str,
    layout: Layout,
    end_lsn: int,
    topic_prefix: str,
) -> SlotRun:
    """One `cdc-relay run` per slot of the layout, all started at once, until every slot is
    confirmed past the backlog (a relay confirms only what Kafka acknowledged, and idle
    positions once its share is done); each walsender's and relay's CPU time read then, the
    relay's from the moment its walsender is active (its start-up is not per-event work)."""
    slots = [contenders.copy_slot(conn, ORIGIN_SLOT) for _ in range(layout.slots)]
    relays = [
        RelayProcess(
            relay_env(
                url,
                bootstrap,
                slot_name=slot,
                publication_name=publication,
                outbox_table=table,
                topic_template=f"{topic_prefix}.{{aggregate_type}}",
                dead_letter_topic=f"{topic_prefix}.dead-letter",
                status_interval_seconds="0.05",
            )
        )
        for slot, publication, table in zip(slots, layout.publications, layout.tables, strict=True)
    ]
    walsender_cpu: dict[str, float] = {}
    relay_cpu: dict[str, float] = {}
    start_cpu: dict[str, float] = {}
    try:
        started = time.perf_counter()
        for relay in relays:
            relay.start()
        while len(walsender_cpu) < len(slots):
            for slot, relay in zip(slots, relays, strict=True):
                if slot in walsender_cpu:
                    continue
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
                if row and row[1] and slot not in start_cpu:
                    # Streaming from here on: the relay's start-up (imports, connections,
                    # the producer) is not per-event work.
                    start_cpu[slot] = cpu_seconds(relay.pid)
                if row and row[0] and row[1] and lsn_int(str(row[0])) >= end_lsn:
                    walsender_cpu[slot] = cpu_seconds(int(row[1]))
                    relay_cpu[slot] = cpu_seconds(relay.pid) - start_cpu.get(slot, 0.0)
                elif not relay.running():
                    raise RuntimeError(f"a relay exited early:\n{relay.log()[-3000:]}")
            if time.perf_counter() - started > 600:
                raise RuntimeError("the relays did not drain the backlog in 600 s")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        published = []
        for relay in relays:
            code = relay.stop()
            counts = _PUBLISHED.findall(relay.log())
            if code != 0 or not counts:
                raise RuntimeError(f"relay exit code {code}:\n{relay.log()[-3000:]}")
            published.append(int(counts[-1]))
    finally:
        for relay in relays:
            relay.kill()
            relay.log_path.unlink(missing_ok=True)
        for slot in slots:
            contenders.drop_slot(conn, slot)
    return SlotRun(
        tuple(walsender_cpu[s] for s in slots),
        tuple(published),
        seconds,
        tuple(relay_cpu[s] for s in slots),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale_out", description=__doc__.split("\n")[0]
    )
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--payload-bytes", type=int, default=300)
    p.add_argument("--txn-size", type=int, default=10)
    p.add_argument("--aggregates", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--slots", default="1,2,4", help="slot counts; each must divide the largest")
    p.add_argument(
        "--readers",
        default=",".join(READERS),
        help=f"how the streams are read, of: {', '.join(READERS)}",
    )
    p.add_argument("--label", default="", help="conditions of this run, printed with it")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--no-output", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.slot_counts = sorted({int(n) for n in args.slots.split(",")})
    args.readers = list(dict.fromkeys(args.readers.split(",")))
    if not set(args.readers) <= set(READERS):
        p.error(f"--readers: choose among {', '.join(READERS)}")
    partitions = max(args.slot_counts)
    if any(n < 1 or partitions % n for n in args.slot_counts):
        p.error("--slots: every count must be at least 1 and divide the largest")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(args.events, args.payload_bytes, args.txn_size, args.aggregates)
    partitions = max(args.slot_counts)
    load_before = os.getloadavg()
    say(f"workload {workload}, slots {args.slot_counts}, {args.repeat} run(s) each")
    pg_settings = {"shared_buffers": "256MB", "max_wal_size": "8GB", "autovacuum": "off"}
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer(settings=pg_settings))
        # The heap Kafka's own start script gives a broker, as bench.run.
        broker = (
            stack.enter_context(KafkaBroker(heap_mb=1024)) if "cdc-relay" in args.readers else None
        )
        version = pg.query("SHOW server_version")[0][0]
        url = pg.create_database("bench_scale_out")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET cdc_relay.partitions = {partitions}")
            conn.execute(recipes.read("outbox_hash.sql"))
            conn.execute(
                f"CREATE PUBLICATION {ALL} FOR TABLE public.outbox "
                "WITH (publish = 'insert', publish_via_partition_root = true)"
            )
            conn.execute("CREATE TABLE scale_unpublished (id int)")
            conn.execute(f"CREATE PUBLICATION {NONE} FOR TABLE scale_unpublished")
            layouts = make_layouts(conn, args.slot_counts, partitions)
            if broker is not None:
                # The relay's control tables (and its checks), once, beside the outbox.
                done = cli(
                    relay_env(url, broker.bootstrap, slot_name="scale_setup", publication_name=ALL),
                    "setup",
                )
                if done.returncode != 0:
                    raise RuntimeError(f"cdc-relay setup failed: {done.stderr}")
                conn.execute("SELECT pg_drop_replication_slot('scale_setup')")
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (ORIGIN_SLOT,)
            )
            start_lsn = lsn_int(
                str(
                    conn.execute(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                        "WHERE slot_name = %s",
                        (ORIGIN_SLOT,),
                    ).fetchone()[0]  # type: ignore[index]
                )
            )
            say(f"filling the backlog: {workload.events:,} events over {partitions} partitions")
            fill_outbox(
                conn,
                "outbox",
                first=0,
                count=workload.events,
                txn_size=workload.txn_size,
                aggregates=workload.aggregates,
                pad=workload.pad,
            )
            conn.execute("CHECKPOINT")
            shares: dict[str, int] = dict(
                conn.execute(
                    "SELECT tableoid::regclass::text, count(*) FROM outbox GROUP BY 1"
                ).fetchall()
            )
            # The backlog's end: the last Commit's end LSN, from one full read (which also
            # warms the caches; its figures are not used).
            slot = contenders.copy_slot(conn, ORIGIN_SLOT)
            try:
                _, inserts, end_lsn = contenders.stream_ceiling(url, slot, workload.transactions)
            finally:
                contenders.drop_slot(conn, slot)
            if inserts != workload.events:
                raise RuntimeError(f"the stream had {inserts} inserts, not {workload.events}")
            wal_bytes = end_lsn - start_lsn
            say(
                f"backlog: {wal_bytes / 1e6:.1f} MB of WAL, "
                f"{wal_bytes / workload.events:.0f} B/event"
            )

            runnable = {
                reader: [layout for layout in layouts if reader == "eager" or layout.tables]
                for reader in args.readers
            }
            cases = {
                reader: [SlotCase(layout.slots, layout.covers) for layout in runnable[reader]]
                for reader in args.readers
            }
            context = multiprocessing.get_context("spawn")
            with context.Pool(partitions) as pool:
                pool.map(_ready, range(partitions))  # spawned and imported before any timing
                for i in range(args.repeat):
                    for reader in args.readers:
                        for layout, case in zip(runnable[reader], cases[reader], strict=True):
                            if broker is not None and reader == "cdc-relay":
                                run = run_relays(
                                    conn,
                                    url,
                                    fresh_broker(broker),
                                    layout,
                                    end_lsn,
                                    f"scale{i}-{layout.slots}",
                                )
                            else:
                                run = run_case(pool, conn, url, layout, end_lsn)
                            check_shares(layout, run, workload.events, shares, partitions)
                            case.runs.append(run)
                            cpu = ", ".join(f"{c:.2f}" for c in run.walsender_cpu)
                            say(
                                f"run {i + 1}/{args.repeat}, {reader}: {layout.slots} slot(s), "
                                f"{layout.covers}: walsender CPU s {cpu}, {run.seconds:.1f} s"
                            )
    load_after = os.getloadavg()
    tables = []
    for reader in args.readers:
        tables += [
            f"Reader {reader}: {READERS[reader]}.",
            "",
            report.scale_out_table(cases[reader], events=workload.events, wal_bytes=wal_bytes),
            "",
        ]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m bench.scale_out " + shlex.join(sys.argv[1:])
    section = "\n".join(
        [
            f"### Run of {when}" + (f" — {args.label}" if args.label else ""),
            "",
            f"`{command.strip()}`: {workload.events:,} events of ~{workload.payload_bytes} B "
            f"JSON in transactions of {workload.txn_size}, {workload.aggregates:,} aggregates, "
            f"over {partitions} hash partitions; {wal_bytes / 1e6:.1f} MB of WAL "
            f"({wal_bytes / workload.events:.0f} B per event); median of {args.repeat} run(s). "
            f"PostgreSQL {version}"
            + (f", Apache Kafka {broker.version} (one KRaft node)" if broker else "")
            + f"; {os.cpu_count()} cores; load average "
            f"{load_before[0]:.2f} at start, {load_after[0]:.2f} at the end. Per event and per "
            "MB: of the whole backlog, whatever the slot's publication carries.",
            "",
            *tables,
        ]
    ).rstrip("\n")
    print()
    print(section)
    if not args.no_output:
        write_section(args.output, section, BEGIN_MARK, END_MARK)
        say(f"wrote {args.output}")
    return 0


def check_shares(
    layout: Layout, run: SlotRun, events: int, shares: dict[str, int], partitions: int
) -> None:
    """Every stream carried exactly what its publication covers."""
    if layout.publications[0] == ALL:
        expected = [events] * layout.slots
    elif layout.publications[0] == NONE:
        expected = [0]
    else:
        n = layout.slots
        expected = [
            sum(shares.get(f"outbox_p{p}", 0) for p in range(k, partitions, n)) for k in range(n)
        ]
    if list(run.inserts) != expected:
        raise RuntimeError(f"{layout}: streams carried {run.inserts} inserts, not {expected}")


if __name__ == "__main__":
    sys.exit(main())
